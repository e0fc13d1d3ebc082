/*
 * Trusty IPC user-space types, laid out as in AOSP's <trusty/ipc.h>
 * (system/core trusty/libtrusty/include/trusty/ipc.h, the Linux UAPI
 * include/uapi/linux/trusty/ipc.h; spec §7.1).
 *
 * Only the types that the libtrusty functions take are declared here: the
 * in-process stack behind <trusty/tipc.h> has no device node and no ioctls,
 * so TIPC_IOC_CONNECT / TIPC_IOC_SEND_MSG and struct tipc_send_msg_req are
 * left out.
 */
#ifndef TRUSTY_IPC_STACK_TRUSTY_IPC_H
#define TRUSTY_IPC_STACK_TRUSTY_IPC_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * How the memory behind a file descriptor is handed to Trusty.
 *   TRUSTY_SHARE:       both worlds keep access (mapped non-secure).
 *   TRUSTY_LEND:        only Trusty has access while it holds the memory.
 *   TRUSTY_SEND_SECURE: the memory is already secure; only Trusty can use it.
 */
enum transfer_kind {
    TRUSTY_SHARE = 0,
    TRUSTY_LEND = 1,
    TRUSTY_SEND_SECURE = 2,
};

/*
 * One memory object to send with a message (8 bytes, as in the UAPI):
 * the file descriptor of the memory (a memfd or dma-buf) and the way it is
 * transferred, a value of enum transfer_kind.  The field is a 32-bit unsigned
 * integer, as in AOSP, so that the layout does not depend on the size the
 * compiler picks for an enum.
 */
struct trusty_shm {
    int32_t fd;
    uint32_t transfer;
};

#ifdef __cplusplus
}
#endif

#endif /* TRUSTY_IPC_STACK_TRUSTY_IPC_H */
