/*
 * AOSP tipc-test's send-fd, written the way its send_fd_test() uses libtrusty: a memory
 * object (a memfd here: no dma-buf heap) with "From NS" at its start goes to
 * com.android.trusty.memref.receiver as the only content of a message (tipc_send with one
 * struct trusty_shm, TRUSTY_SHARE); after the 1-byte sync reply every page must start with
 * "Hello from Trusty!", read through this process's own mapping. Also the transfer kinds and
 * fd modes the stack refuses, with the driver's errno.
 *
 *   tipc_send_fd DEVICE            run the checks; "N passed, M failed"; exit 1 on failure
 *   tipc_send_fd DEVICE hold       send 8 messages with a memfd each to echo without
 *                                  reading the replies, print "ready", wait to be killed
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <trusty/tipc.h>

#define RECEIVER "com.android.trusty.memref.receiver"
#define ECHO "com.android.ipc-unittest.srv.echo"
#define CHUNK 4096
#define CHUNKS 10

static int passed, failed;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (cond) {                                                          \
            passed++;                                                        \
        } else {                                                             \
            failed++;                                                        \
            printf("FAILED (%s:%d): ", __FILE__, __LINE__);                  \
            printf(__VA_ARGS__);                                             \
            printf(" [errno %d: %s]\n", errno, strerror(errno));             \
        }                                                                    \
    } while (0)

static int make_memfd(size_t size) {
    int fd = memfd_create("tipc-send-fd", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0) return -1;
    return fd;
}

static void send_fd(const char* dev) {
    size_t size = CHUNK * CHUNKS;
    int fd = tipc_connect(dev, RECEIVER);
    CHECK(fd >= 0, "connect to the memref receiver (%d)", fd);
    if (fd < 0) return;
    int mfd = make_memfd(size);
    CHECK(mfd >= 0, "memfd_create");
    if (mfd < 0) return;
    volatile char* buf = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    CHECK(buf != MAP_FAILED, "mmap the memfd");
    if (buf == MAP_FAILED) return;
    strcpy((char*)buf, "From NS");

    /* What the stack cannot honour is refused before anything is shared. */
    struct trusty_shm lend = {.fd = mfd, .transfer = TRUSTY_LEND};
    errno = 0;
    ssize_t rc = tipc_send(fd, NULL, 0, &lend, 1);
    CHECK(rc < 0 && errno == EOPNOTSUPP, "TRUSTY_LEND refused with EOPNOTSUPP (%zd)", rc);
    struct trusty_shm secure = {.fd = mfd, .transfer = TRUSTY_SEND_SECURE};
    errno = 0;
    rc = tipc_send(fd, NULL, 0, &secure, 1);
    CHECK(rc < 0 && errno == ENODATA, "TRUSTY_SEND_SECURE of a memfd refused with ENODATA (%zd)", rc);
    struct trusty_shm bogus = {.fd = mfd, .transfer = 77};
    errno = 0;
    rc = tipc_send(fd, NULL, 0, &bogus, 1);
    CHECK(rc < 0 && errno == EINVAL, "an unknown transfer kind is EINVAL (%zd)", rc);
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", mfd);
    int wronly = open(path, O_WRONLY | O_CLOEXEC);
    struct trusty_shm wo = {.fd = wronly, .transfer = TRUSTY_SHARE};
    errno = 0;
    rc = tipc_send(fd, NULL, 0, &wo, 1);
    CHECK(wronly >= 0 && rc < 0 && errno == EACCES, "a write-only fd is EACCES (%zd)", rc);
    if (wronly >= 0) close(wronly);

    /* AOSP's send_fd_test(). */
    struct trusty_shm shm = {.fd = mfd, .transfer = TRUSTY_SHARE};
    rc = tipc_send(fd, NULL, 0, &shm, 1);
    CHECK(rc == 0, "tipc_send with one memfd (%zd)", rc);
    char c = 1;
    ssize_t r = read(fd, &c, 1);
    CHECK(r == 1 && c == 0, "the receiver's sync byte (%zd)", r);
    tipc_close(fd);
    int bad = 0;
    for (size_t skip = 0; skip < CHUNKS; skip++) {
        if (strcmp("Hello from Trusty!", (const char*)&buf[skip * CHUNK]) != 0) {
            printf("Unexpected content at page %zu in the memfd\n", skip);
            bad++;
        }
    }
    CHECK(bad == 0, "every page says Hello from Trusty!, seen through our own mapping");
    munmap((char*)buf, size);
    close(mfd);
}

/* As the driver: a channel Trusty closed is ENOTCONN before the fd is looked at. A message
 * without a handle makes the receiver close the channel. */
static void closed_channel(const char* dev) {
    int fd = tipc_connect(dev, RECEIVER);
    int mfd = make_memfd(CHUNK * CHUNKS);
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", mfd);
    int wronly = open(path, O_WRONLY | O_CLOEXEC);
    char c = 0;
    ssize_t w = write(fd, &c, 1);
    ssize_t r = read(fd, &c, 1); /* 0 (socket) or -1/ENOTCONN (driver): the channel is closed */
    struct trusty_shm wo = {.fd = wronly, .transfer = TRUSTY_SHARE};
    errno = 0;
    ssize_t rc = tipc_send(fd, NULL, 0, &wo, 1);
    CHECK(fd >= 0 && w == 1 && r <= 0 && rc < 0 && errno == ENOTCONN,
          "a closed channel is ENOTCONN before a write-only fd is EACCES (%zd %zd %zd)", w, r, rc);
    close(wronly);
    close(mfd);
    tipc_close(fd);
}

static int hold(const char* dev) {
    int fd = tipc_connect(dev, ECHO);
    int mfd = make_memfd(CHUNK * CHUNKS);
    if (fd < 0 || mfd < 0) {
        printf("setup failed (%d %d)\n", fd, mfd);
        return 1;
    }
    for (int i = 0; i < 8; i++) {
        char data[16] = {(char)i};
        struct iovec iov = {.iov_base = data, .iov_len = sizeof(data)};
        struct trusty_shm shm = {.fd = mfd, .transfer = TRUSTY_SHARE};
        ssize_t rc = tipc_send(fd, &iov, 1, &shm, 1);
        if (rc != (ssize_t)sizeof(data)) {
            printf("tipc_send failed (%zd, errno %d)\n", rc, errno);
            return 1;
        }
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: tipc_send_fd DEVICE [hold]\n");
        return 2;
    }
    if (argc > 2 && strcmp(argv[2], "hold") == 0) return hold(argv[1]);
    send_fd(argv[1]);
    closed_channel(argv[1]);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
