/*
 * Exercises the libtrusty-compatible C API from C, using only its header:
 * echo round trips through tipc_send (two-part iovec) and tipc_write, reads
 * with tipc_recv, tipc_poll, and every error path a libtrusty user meets.
 *
 * Prints one line per check that fails, then "N passed, M failed"; the exit
 * status is non-zero when any check failed.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <trusty/tipc.h>

#define TRUSTY_DEVICE_NAME "/dev/trusty-ipc-dev0"
#define ECHO_PORT "com.android.ipc-unittest.srv.echo"
#define DATASINK_PORT "com.android.ipc-unittest.srv.datasink"

static int passed;
static int failed;

static void check(int ok, const char* what, long got, long want, int line) {
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL line %d: %s: got %ld, want %ld\n", line, what, got, want);
    }
}

#define CHECK_EQ(got, want) \
    do { \
        long got_ = (long)(got); \
        long want_ = (long)(want); \
        check(got_ == want_, #got, got_, want_, __LINE__); \
    } while (0)

#define CHECK_TRUE(cond) check((cond) != 0, #cond, 0, 1, __LINE__)

/* One echo round trip through tipc_send with the message split over two iovecs. */
static void test_send_iovec(int fd) {
    char first[] = "hello, ";
    char second[] = "trusty";
    struct iovec iov[2] = {
            {.iov_base = first, .iov_len = strlen(first)},
            {.iov_base = second, .iov_len = strlen(second)},
    };
    char reply[64];
    ssize_t n;

    CHECK_EQ(tipc_send(fd, iov, 2, NULL, 0), strlen(first) + strlen(second));
    CHECK_EQ(tipc_poll(fd, 1000) & TIPC_POLLIN, TIPC_POLLIN);
    memset(reply, 0, sizeof(reply));
    n = tipc_recv(fd, reply, sizeof(reply), 1000);
    CHECK_EQ(n, strlen("hello, trusty"));
    CHECK_EQ(memcmp(reply, "hello, trusty", strlen("hello, trusty")), 0);
}

/* Round trips through tipc_write, of several sizes up to the largest message. */
static void test_write(int fd) {
    static unsigned char out[4096];
    static unsigned char in[4096];
    size_t sizes[] = {1, 64, 1000, 4000};
    size_t i, j;

    for (i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        size_t len = sizes[i];
        for (j = 0; j < len; j++) {
            out[j] = (unsigned char)(j * 7 + i);
        }
        CHECK_EQ(tipc_write(fd, out, len), len);
        memset(in, 0, sizeof(in));
        CHECK_EQ(tipc_recv(fd, in, sizeof(in), -1), len);
        CHECK_EQ(memcmp(in, out, len), 0);
    }
}

/* Nothing queued: poll times out with 0, a non-blocking recv gives -EAGAIN, a
 * timed one -ETIMEDOUT. */
static void test_nothing_queued(int fd) {
    char buf[16];

    CHECK_EQ(tipc_poll(fd, 0), 0);
    CHECK_EQ(tipc_poll(fd, 20), 0);
    CHECK_EQ(tipc_recv(fd, buf, sizeof(buf), 0), -EAGAIN);
    CHECK_EQ(tipc_recv(fd, buf, sizeof(buf), 20), -ETIMEDOUT);
}

/* A buffer smaller than the message: -EMSGSIZE, and the message stays queued. */
static void test_recv_too_small(int fd) {
    char small[4];
    char big[64];
    const char msg[] = "a message longer than four bytes";

    CHECK_EQ(tipc_write(fd, msg, strlen(msg)), strlen(msg));
    CHECK_EQ(tipc_poll(fd, 1000) & TIPC_POLLIN, TIPC_POLLIN);
    CHECK_EQ(tipc_recv(fd, small, sizeof(small), 1000), -EMSGSIZE);
    CHECK_EQ(tipc_poll(fd, 0), TIPC_POLLIN);
    memset(big, 0, sizeof(big));
    CHECK_EQ(tipc_recv(fd, big, sizeof(big), 1000), strlen(msg));
    CHECK_EQ(memcmp(big, msg, strlen(msg)), 0);
}

static void test_message_too_big(int fd) {
    static char huge[8192];
    struct iovec iov[2] = {
            {.iov_base = huge, .iov_len = 4000},
            {.iov_base = huge + 4000, .iov_len = 4000},
    };

    CHECK_EQ(tipc_write(fd, huge, sizeof(huge)), -EMSGSIZE);
    CHECK_EQ(tipc_send(fd, iov, 2, NULL, 0), -EMSGSIZE);
    /* The channel is still usable afterwards. */
    CHECK_EQ(tipc_write(fd, "ok", 2), 2);
    CHECK_EQ(tipc_recv(fd, huge, sizeof(huge), 1000), 2);
}

static void test_bad_arguments(int fd) {
    char buf[8] = "x";
    struct iovec iov = {.iov_base = buf, .iov_len = 1};
    struct iovec null_iov = {.iov_base = NULL, .iov_len = 4};
    struct trusty_shm shm = {.fd = 0, .transfer = TRUSTY_SHARE};
    struct trusty_shm bad_kind = {.fd = 0, .transfer = 7};

    CHECK_EQ(tipc_send(fd, &iov, -1, NULL, 0), -EINVAL);
    CHECK_EQ(tipc_send(fd, NULL, 1, NULL, 0), -EINVAL);
    CHECK_EQ(tipc_send(fd, &null_iov, 1, NULL, 0), -EINVAL);
    CHECK_EQ(tipc_send(fd, &iov, 1, NULL, 1), -EINVAL);
    CHECK_EQ(tipc_send(fd, &iov, 1, NULL, -1), -EINVAL);
    CHECK_EQ(tipc_send(fd, &iov, 1, &bad_kind, 1), -EINVAL);
    /* A memory object the in-process stack cannot resolve: a bad fd. */
    CHECK_EQ(tipc_send(fd, &iov, 1, &shm, 1), -EBADF);
    CHECK_EQ(tipc_write(fd, NULL, 4), -EINVAL);
    CHECK_EQ(tipc_recv(fd, NULL, 4, 0), -EINVAL);
    /* None of those sent anything. */
    CHECK_EQ(tipc_poll(fd, 20), 0);
}

static void test_connect_errors(void) {
    char long_name[257];

    memset(long_name, 'a', 256);
    long_name[256] = '\0';
    CHECK_EQ(tipc_connect("/dev/trusty-ipc-dev9", ECHO_PORT), -ENOENT);
    CHECK_EQ(tipc_connect("/dev/null", ECHO_PORT), -ENOENT);
    CHECK_EQ(tipc_connect(TRUSTY_DEVICE_NAME, long_name), -ENAMETOOLONG);
    CHECK_EQ(tipc_connect(TRUSTY_DEVICE_NAME, "foo"), -ENOTCONN);
    CHECK_EQ(tipc_connect(TRUSTY_DEVICE_NAME, NULL), -EINVAL);
    CHECK_EQ(tipc_connect(NULL, ECHO_PORT), -EINVAL);
    CHECK_EQ(tipc_connect(TRUSTY_DEVICE_NAME, ""), -EINVAL);
}

static void test_closed_handle(void) {
    char buf[8];
    int fd = tipc_connect(TRUSTY_DEVICE_NAME, ECHO_PORT);

    CHECK_TRUE(fd >= 0);
    CHECK_EQ(tipc_close(fd), 0);
    CHECK_EQ(tipc_write(fd, "x", 1), -EBADF);
    CHECK_EQ(tipc_recv(fd, buf, sizeof(buf), 0), -EBADF);
    CHECK_EQ(tipc_poll(fd, 0), -EBADF);
    CHECK_EQ(tipc_close(fd), -EBADF);
    CHECK_EQ(tipc_close(-1), -EBADF);
    CHECK_EQ(tipc_close(1000), -EBADF);
}

/* Handles are the lowest free ones, and a closed one is given out again. */
static void test_handles(void) {
    int a = tipc_connect("sim", ECHO_PORT);
    int b = tipc_connect(TRUSTY_DEVICE_NAME, DATASINK_PORT);
    int c;

    CHECK_TRUE(a >= 0);
    CHECK_TRUE(b >= 0 && b != a);
    CHECK_EQ(tipc_close(a), 0);
    c = tipc_connect(TRUSTY_DEVICE_NAME, ECHO_PORT);
    CHECK_EQ(c, a);
    CHECK_EQ(tipc_write(b, "sunk", 4), 4);
    CHECK_EQ(tipc_poll(b, 20), 0);
    CHECK_EQ(tipc_close(b), 0);
    CHECK_EQ(tipc_close(c), 0);
}

int main(void) {
    int fd;

    CHECK_EQ(tipc_init(NULL), 0);
    CHECK_EQ(tipc_init("native-api5"), 0);
    CHECK_EQ(tipc_init("xen-dom0"), -EBUSY);

    fd = tipc_connect(TRUSTY_DEVICE_NAME, ECHO_PORT);
    CHECK_TRUE(fd >= 0);
    if (fd >= 0) {
        test_send_iovec(fd);
        test_write(fd);
        test_nothing_queued(fd);
        test_recv_too_small(fd);
        test_message_too_big(fd);
        test_bad_arguments(fd);
        CHECK_EQ(tipc_close(fd), 0);
    }
    test_connect_errors();
    test_closed_handle();
    test_handles();

    /* After shutdown, old handles are gone and a connect starts the stack again. */
    fd = tipc_connect(TRUSTY_DEVICE_NAME, ECHO_PORT);
    CHECK_TRUE(fd >= 0);
    tipc_shutdown();
    CHECK_EQ(tipc_write(fd, "x", 1), -EBADF);
    CHECK_EQ(tipc_init("no-such-platform"), -ENOENT);
    fd = tipc_connect(TRUSTY_DEVICE_NAME, ECHO_PORT);
    CHECK_EQ(fd, 0);
    CHECK_EQ(tipc_write(fd, "again", 5), 5);
    {
        char buf[8];
        CHECK_EQ(tipc_recv(fd, buf, sizeof(buf), 1000), 5);
    }
    CHECK_EQ(tipc_close(fd), 0);
    tipc_shutdown();
    tipc_shutdown();

    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
