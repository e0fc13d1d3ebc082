/*
 * AOSP libtrusty's C API (system/core trusty/libtrusty/include/trusty/tipc.h),
 * implemented by this project's crate libtrusty-capi (library trusty_capi).
 *
 * tipc_connect returns a file descriptor.  On it, as on the kernel driver's
 * (drivers/trusty/trusty-ipc.c): one write(2)/writev(2) sends one message, one
 * read(2)/readv(2) returns one whole message, poll(2)/select(2) report POLLIN
 * when a message is queued and POLLOUT while writes are accepted, and
 * close(2) (or tipc_close) ends the channel.
 *
 * dev_name chooses the way to Trusty, as AOSP's library does:
 *   "VSOCK:[STREAM:|SEQPACKET:]cid:port"  Trusty's vsock bridge (or trusty-ipcd's
 *                    vsock listener): the port name goes in the first packet,
 *                    one status byte comes back once connected;
 *   a path to a socket   trusty-ipcd (trusty-ipcd --socket PATH), same convention
 *                    over AF_UNIX SOCK_SEQPACKET;
 *   any other path   the kernel driver (/dev/trusty-ipc-dev0):
 *                    open(O_RDWR), ioctl(TIPC_IOC_CONNECT);
 *   "sim", "sim-threaded", a platform profile name (test builds only: feature
 *                    `sim`)  a stack on the embedded Trusty model inside this
 *                    process, served by a thread; fds as with trusty-ipcd.
 *
 * Where a socket channel differs from the driver's fd: once Trusty closes the
 * channel, poll reports POLLHUP (and POLLIN) where the driver reports POLLERR,
 * read returns 0 after the queued messages where the driver fails with
 * ENOTCONN, and write fails with EPIPE (tipc_send reports ENOTCONN).  So that
 * such a write does not kill the program, the first socket channel sets
 * SIGPIPE to SIG_IGN if the program left it at SIG_DFL.  A message larger than
 * the largest TIPC message is dropped by the daemon (and logged) instead of
 * failing with EMSGSIZE.
 */
#ifndef TRUSTY_IPC_STACK_TRUSTY_TIPC_H
#define TRUSTY_IPC_STACK_TRUSTY_TIPC_H

#include <sys/types.h>
#include <sys/uio.h>

#include <trusty/ipc.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Connects to the Trusty service srv_name through dev_name.
 *
 * Returns a file descriptor (>= 0), or a negative errno: -EINVAL (NULL or
 * non-UTF-8 name, empty port name, malformed VSOCK name), -ENOENT (no such
 * device), -ENAMETOOLONG (port name of 256 bytes or more), -ENOTCONN (no such
 * port, or the service refused; through a socket also any other failure of
 * the connect, which the daemon reports by closing), -ETIMEDOUT (no answer),
 * the errno of open/ioctl on the driver, or of socket/connect on a socket
 * (-ECONNREFUSED when no daemon listens).
 */
int tipc_connect(const char* dev_name, const char* srv_name);

/*
 * Sends one message: the concatenation of the iovcnt buffers of iov, and the
 * shmcnt memory objects of shm.  Returns the number of data bytes sent.
 *
 * On the kernel driver this is ioctl(TIPC_IOC_SEND_MSG): failures return -1
 * with errno set, as AOSP's tipc_send.  On a socket channel failures return a
 * negative errno (as AOSP's vsock path does) and set errno as well; memory
 * objects are not supported there yet (-EOPNOTSUPP).  Either way, "< 0" is a
 * failure.  Invalid arguments (negative counts, iovcnt above 1024, NULL
 * arrays with non-zero counts) give -EINVAL.
 */
ssize_t tipc_send(int fd, const struct iovec* iov, int iovcnt, struct trusty_shm* shm, int shmcnt);

/* Closes the channel; returns close(2)'s result. */
int tipc_close(int fd);

#ifdef __cplusplus
}
#endif

#endif /* TRUSTY_IPC_STACK_TRUSTY_TIPC_H */
