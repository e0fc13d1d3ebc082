/*
 * Many client processes, many channels: written like an AOSP client
 * (tipc_connect / tipc_close, read / write on the fds).
 *
 *   tipc_stress DEVICE PROCS CHANNELS ROUNDS
 *       forks PROCS processes; each opens CHANNELS echo channels and, ROUNDS
 *       times, writes one message on every channel, then reads every reply and
 *       checks it byte for byte (sizes and contents differ per process, channel
 *       and round). Exits 0 when every process passed.
 *   tipc_stress DEVICE hold CHANNELS
 *       opens CHANNELS echo channels, prints "ready", then echoes on them until
 *       killed (the test kills it mid-traffic).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <trusty/tipc.h>

#define ECHO "com.android.ipc-unittest.srv.echo"
#define MAXCH 64

static size_t msg_len(int p, int c, int r) { return 1 + (size_t)((p * 131 + c * 17 + r * 7) % 1000); }

static void fill(unsigned char* b, size_t n, int p, int c, int r) {
    for (size_t i = 0; i < n; i++) b[i] = (unsigned char)(p * 7 + c * 13 + r * 3 + i);
}

static int client(const char* dev, int p, int nch, int rounds) {
    int fds[MAXCH];
    unsigned char tx[1024], rx[2048];
    for (int c = 0; c < nch; c++) {
        fds[c] = tipc_connect(dev, ECHO);
        if (fds[c] < 0) {
            fprintf(stderr, "process %d: connect %d failed: %d\n", p, c, fds[c]);
            return 1;
        }
    }
    for (int r = 0; r < rounds; r++) {
        for (int c = 0; c < nch; c++) {
            size_t n = msg_len(p, c, r);
            fill(tx, n, p, c, r);
            if (write(fds[c], tx, n) != (ssize_t)n) {
                fprintf(stderr, "process %d channel %d round %d: write failed: %s\n", p, c, r, strerror(errno));
                return 1;
            }
        }
        for (int c = 0; c < nch; c++) {
            size_t n = msg_len(p, c, r);
            fill(tx, n, p, c, r);
            ssize_t got = read(fds[c], rx, sizeof(rx));
            if (got != (ssize_t)n || memcmp(tx, rx, n) != 0) {
                fprintf(stderr, "process %d channel %d round %d: reply of %zd bytes, want %zu (or data differs)\n", p, c,
                        r, got, n);
                return 1;
            }
        }
    }
    for (int c = 0; c < nch; c++) tipc_close(fds[c]);
    return 0;
}

static int hold(const char* dev, int nch) {
    int fds[MAXCH];
    unsigned char buf[512];
    for (int c = 0; c < nch; c++) {
        fds[c] = tipc_connect(dev, ECHO);
        if (fds[c] < 0) return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (unsigned r = 0;; r++) {
        for (int c = 0; c < nch; c++) {
            memset(buf, (int)(r + c), sizeof(buf));
            if (write(fds[c], buf, sizeof(buf)) != (ssize_t)sizeof(buf)) return 1;
        }
        for (int c = 0; c < nch; c++)
            if (read(fds[c], buf, sizeof(buf)) != (ssize_t)sizeof(buf)) return 1;
    }
}

int main(int argc, char** argv) {
    if (argc == 4 && strcmp(argv[2], "hold") == 0) {
        int nch = atoi(argv[3]);
        return nch > 0 && nch <= MAXCH ? hold(argv[1], nch) : 2;
    }
    if (argc != 5) {
        fprintf(stderr, "usage: %s DEVICE PROCS CHANNELS ROUNDS | DEVICE hold CHANNELS\n", argv[0]);
        return 2;
    }
    int procs = atoi(argv[2]), nch = atoi(argv[3]), rounds = atoi(argv[4]);
    if (procs <= 0 || nch <= 0 || nch > MAXCH || rounds <= 0) return 2;
    /* The parent holds a channel across the forks (with "sim", the children must not use the
     * parent's in-process stack, whose serving thread fork() does not copy). */
    int parent_fd = tipc_connect(argv[1], ECHO);
    if (parent_fd < 0) {
        fprintf(stderr, "parent: connect failed: %d\n", parent_fd);
        return 1;
    }
    for (int p = 0; p < procs; p++) {
        pid_t pid = fork();
        if (pid < 0) return 1;
        if (pid == 0) _exit(client(argv[1], p, nch, rounds));
    }
    int failed = 0;
    for (int p = 0; p < procs; p++) {
        int st = 0;
        if (wait(&st) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) failed++;
    }
    unsigned char ping[4] = {1, 2, 3, 4}, pong[8];
    if (write(parent_fd, ping, 4) != 4 || read(parent_fd, pong, sizeof(pong)) != 4) failed++;
    tipc_close(parent_fd);
    printf("%d processes x %d channels x %d rounds: %d failed\n", procs, nch, rounds, failed);
    return failed ? 1 : 0;
}
