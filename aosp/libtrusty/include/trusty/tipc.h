/*
 * libtrusty-compatible C API over the in-process normal-world Trusty IPC stack
 * (crate libtrusty-capi, library trusty_capi).
 *
 * tipc_connect, tipc_send and tipc_close have AOSP libtrusty's names and
 * signatures (system/core trusty/libtrusty/include/trusty/tipc.h; spec §7.4).
 * With the kernel driver a channel is a file descriptor, so libtrusty users
 * read, write and poll it with read(2), write(2) and poll(2).  Here a channel is
 * a handle of the in-process stack, not a kernel file descriptor, so this
 * header adds tipc_recv, tipc_write and tipc_poll for those operations, and
 * tipc_init / tipc_shutdown to start and stop the stack.
 *
 * Conventions:
 *   - Every function that can fail returns a negative errno value (-ENOENT,
 *     -ENOTCONN, ...) and leaves errno alone.  The values are those AOSP's
 *     trusty-ipc driver reports for the same condition (spec §7.3).
 *     (libtrusty's own tipc_send passes the ioctl's -1 through and leaves the
 *     code in errno; callers that test "< 0" behave the same with either.)
 *   - Handles are small non-negative integers, the lowest free one first, like
 *     file descriptors; a handle is never given out twice while it is open.
 *   - A NULL pointer where data is required gives -EINVAL; it never crashes.
 *   - Every function may be called from any thread.  One lock guards the
 *     stack; calls that wait (tipc_recv, tipc_poll, a tipc_send waiting for a
 *     free buffer) release it at least every few milliseconds, so a thread
 *     blocked on one channel does not stop others.  tipc_connect holds it until
 *     the secure side has answered (at most the 5 s connect timeout).
 *   - No Rust panic crosses this interface: an internal failure returns -EIO.
 */
#ifndef TRUSTY_IPC_STACK_TRUSTY_TIPC_H
#define TRUSTY_IPC_STACK_TRUSTY_TIPC_H

#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <trusty/ipc.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bits of the mask tipc_poll returns (same values as POLLIN and POLLERR). */
#define TIPC_POLLIN 1
#define TIPC_POLLERR 8

/* Port names must be shorter than this, in bytes (spec §6.3). */
#define TIPC_MAX_SRV_NAME_LEN 256

/*
 * Starts the in-process stack on a simulated platform.  platform names a
 * platform profile ("native-api5", "native-api4", "xen-dom0",
 * "xen-domu-ffa-mediator", ...; see `tipc-test --list-platforms`); NULL means
 * the default embedded model, "native-api5" (no hypervisor, Trusty API 5 with
 * FF-A).
 *
 * Calling it is optional: the first tipc_connect brings the default platform
 * up if the stack is not running.
 *
 * Returns 0 on success (also when the same platform is already running),
 * -EBUSY if a different platform is running (call tipc_shutdown first),
 * -ENOENT for an unknown platform name, -EINVAL for a name that is not UTF-8,
 * -ENODEV if the platform offers no safe way to reach Trusty, or the errno of
 * the failed bring-up step.
 */
int tipc_init(const char* platform);

/*
 * Stops the stack: every open handle becomes invalid (-EBADF), the TIPC device
 * is torn down and the simulated machine is dropped.  Does nothing if the
 * stack is not running.  A later tipc_connect or tipc_init starts it again.
 */
void tipc_shutdown(void);

/*
 * Connects to the Trusty service srv_name through the TIPC device dev_name.
 *
 * dev_name: "sim" (the stack's TIPC device), or "/dev/trusty-ipc-NAME" where
 * NAME is the device name in the TIPC device's configuration ("dev0" on the
 * embedded model: "/dev/trusty-ipc-dev0", what Android code passes).  Any
 * other name gives -ENOENT.
 *
 * Returns a handle (>= 0), or -EINVAL (a NULL name, an empty port name or one
 * that is not UTF-8, or the device is offline: the kernel driver's open()
 * answers EINVAL then), -ENOENT (no such device), -ENAMETOOLONG (port name of
 * 256 bytes or more), -ENOTCONN (no such port, or the service refused),
 * -ETIMEDOUT (no answer within 5 s), -EIO (the device went offline before the
 * answer came), or the error of starting the stack (see tipc_init).
 */
int tipc_connect(const char* dev_name, const char* srv_name);

/*
 * Sends one message: the concatenation of the iovcnt buffers of iov, and the
 * shmcnt memory objects of shm.  Returns the number of data bytes sent.
 *
 * Errors: -EBADF (not an open handle), -EINVAL (iovcnt or shmcnt negative,
 * iovcnt above 1024, iov or shm NULL with a non-zero count, an iov_base NULL
 * with a non-zero iov_len, a transfer kind that is not one of enum
 * transfer_kind), -EMSGSIZE (the message does not fit one message buffer),
 * -ENOTCONN / -ESHUTDOWN (the channel is not connected / is stale),
 * -ETIMEDOUT (no free message buffer within 15 s), -ENODEV (device offline).
 * As in the kernel driver, a free message buffer is waited for first
 * (-ENODEV / -ETIMEDOUT), then the size is checked (-EMSGSIZE), then the
 * channel (-ENOTCONN / -ESHUTDOWN); with shm references, a channel that is not
 * connected is -ENOTCONN before anything else.
 *
 * Memory objects: the in-process stack cannot resolve a file descriptor into
 * memory it could share (there is no dma-buf or memfd import), so a valid
 * entry gives -EBADF, the driver's errno for a descriptor that does not name
 * shareable memory.  shmcnt == 0 (shm may then be NULL) always works.
 */
ssize_t tipc_send(int fd, const struct iovec* iov, int iovcnt, struct trusty_shm* shm, int shmcnt);

/*
 * Sends len bytes of buf as one message (what write(2) does on a libtrusty
 * file descriptor).  Returns len, or the errors of tipc_send (buf NULL with a
 * non-zero len: -EINVAL).
 */
ssize_t tipc_write(int fd, const void* buf, size_t len);

/*
 * Receives one whole message into buf (what read(2) does on a libtrusty file
 * descriptor) and returns its length.
 *
 * timeout_ms < 0 waits without limit; 0 does not wait (-EAGAIN if no message
 * is queued); > 0 waits at most that long (-ETIMEDOUT).
 *
 * Errors: -EMSGSIZE (buf is smaller than the next message; the message stays
 * queued and a later call with a larger buffer gets it), -EBADF, -EINVAL (buf
 * NULL with a non-zero len), -ENOTCONN (the peer closed the channel and
 * nothing is queued), -ESHUTDOWN, -EAGAIN, -ETIMEDOUT, -ENODEV.
 */
ssize_t tipc_recv(int fd, void* buf, size_t len, int timeout_ms);

/*
 * Waits until the channel has a message to read (TIPC_POLLIN) or is not
 * connected (TIPC_POLLERR: refused, closed by the peer, stale), and returns
 * those bits.  Returns 0 when timeout_ms passes first (timeout_ms < 0: no
 * limit; 0: look once, do not wait), or -EBADF / -ENODEV.
 */
int tipc_poll(int fd, int timeout_ms);

/*
 * Closes a handle: queued messages are dropped and the peer is told.  The
 * handle is free again on return, even when telling the peer failed (that
 * error is returned).  Returns 0, or -EBADF if fd is not an open handle.
 */
int tipc_close(int fd);

#ifdef __cplusplus
}
#endif

#endif /* TRUSTY_IPC_STACK_TRUSTY_TIPC_H */
