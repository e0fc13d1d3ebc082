/*
 * Trusty IPC user-space types and ioctls, laid out as in AOSP's <trusty/ipc.h>
 * (system/core trusty/libtrusty/include/trusty/ipc.h, a copy of the Linux UAPI
 * include/uapi/linux/trusty/ipc.h; spec §7.1).
 *
 * The include guard is this project's own, so that a file that also includes
 * the kernel's UAPI header does not silently lose one of the two.
 */
#ifndef TRUSTY_IPC_STACK_TRUSTY_IPC_H
#define TRUSTY_IPC_STACK_TRUSTY_IPC_H

#include <linux/ioctl.h>
#include <linux/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * How the memory behind a file descriptor is handed to Trusty.
 *   TRUSTY_SHARE:       both worlds keep access (mapped non-secure).
 *   TRUSTY_LEND:        only Trusty has access while it holds the memory.
 *   TRUSTY_SEND_SECURE: the memory is already secure; only Trusty can use it.
 *   TRUSTY_SEND_SECURE_OR_SHARE: TRUSTY_SEND_SECURE where the buffer is secure,
 *                       TRUSTY_SHARE otherwise.
 */
enum transfer_kind {
    TRUSTY_SHARE = 0,
    TRUSTY_LEND = 1,
    TRUSTY_SEND_SECURE = 2,
    TRUSTY_SEND_SECURE_OR_SHARE = 3,
};

/*
 * One memory object to send with a message (8 bytes, as in the UAPI): the
 * file descriptor of the memory (a memfd or dma-buf) and the way it is
 * transferred, a value of enum transfer_kind.
 */
struct trusty_shm {
    __s32 fd;
    __u32 transfer;
};

/*
 * The argument of TIPC_IOC_SEND_MSG: user addresses of an array of struct
 * iovec and of an array of struct trusty_shm, and their counts, all 64-bit.
 */
struct tipc_send_msg_req {
    __u64 iov;
    __u64 shm;
    __u64 iov_cnt;
    __u64 shm_cnt;
};

#define TIPC_IOC_MAGIC 'r'
#define TIPC_IOC_CONNECT _IOW(TIPC_IOC_MAGIC, 0x80, char*)
#define TIPC_IOC_SEND_MSG _IOW(TIPC_IOC_MAGIC, 0x81, struct tipc_send_msg_req)

#ifdef __cplusplus
}
#endif

#endif /* TRUSTY_IPC_STACK_TRUSTY_IPC_H */
