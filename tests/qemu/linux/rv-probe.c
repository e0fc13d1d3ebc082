/*
 * rv-probe VM_DOMID: the guest side of the Trusty VM rendezvous (platform/src/xen/rendezvous.rs)
 * and one call through the mailbox (platform/src/mailbox.rs), from Linux userspace with
 * /dev/xen/{gntdev,evtchn,gntalloc}. A check of the emulation set-up that needs no daemon:
 * prints "rv-probe: PASS ..." and exits 0, or says what failed and exits 1.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
typedef uint16_t domid_t;
typedef uint32_t grant_ref_t;
#include <xen/evtchn.h>
#include <xen/gntalloc.h>
#include <xen/gntdev.h>

#define RENDEZVOUS_GREF 8
#define OFFER_MAGIC 0x4d565254u /* "TRVM" */
#define GUEST_MAGIC 0x54535547u /* "GUST" */
#define MAILBOX_MAGIC 0x43504954u /* "TIPC" */
#define FC_API_VERSION 0xbc00000bu

static int ev = -1;

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int fail(const char *what)
{
	printf("rv-probe: FAIL: %s (%s)\n", what, errno ? strerror(errno) : "-");
	return 1;
}

static volatile uint32_t *word(volatile void *page, int off)
{
	return (volatile uint32_t *)((volatile char *)page + off);
}

/* Waits at most `ms` for an event; returns 1 if one came (and unmasks the port). */
static int wait_event(int ms)
{
	struct pollfd p = { .fd = ev, .events = POLLIN };
	uint32_t port;
	if (poll(&p, 1, ms) <= 0 || read(ev, &port, sizeof port) != sizeof port)
		return 0;
	if (write(ev, &port, sizeof port) != sizeof port) /* unmask */
		return 0;
	return 1;
}

int main(int argc, char **argv)
{
	int vm = argc > 1 ? atoi(argv[1]) : 1;
	int gd = open("/dev/xen/gntdev", O_RDWR);
	int ga = open("/dev/xen/gntalloc", O_RDWR);
	ev = open("/dev/xen/evtchn", O_RDWR);
	if (gd < 0 || ga < 0 || ev < 0)
		return fail("opening /dev/xen/{gntdev,gntalloc,evtchn}");

	/* 1. the Trusty VM's rendezvous page (it may not have granted it yet: retry for 10 s) */
	volatile void *rv = MAP_FAILED;
	double t0 = now();
	while (now() - t0 < 10) {
		struct ioctl_gntdev_map_grant_ref m = { .count = 1 };
		m.refs[0].domid = vm;
		m.refs[0].ref = RENDEZVOUS_GREF;
		if (ioctl(gd, IOCTL_GNTDEV_MAP_GRANT_REF, &m) == 0) {
			void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, gd, m.index);
			if (p != MAP_FAILED && *word(p, 0) == OFFER_MAGIC) {
				rv = p;
				break;
			}
			if (p != MAP_FAILED)
				munmap(p, 4096);
			struct ioctl_gntdev_unmap_grant_ref u = { .index = m.index, .count = 1 };
			ioctl(gd, IOCTL_GNTDEV_UNMAP_GRANT_REF, &u);
		}
		usleep(100000);
	}
	if (rv == MAP_FAILED)
		return fail("no rendezvous offer from the Trusty VM within 10 s");
	__sync_synchronize();
	uint32_t version = *word(rv, 4), vm_domid = *word(rv, 8), port = *word(rv, 12);
	printf("rv-probe: offer: version %u, domain %u, port %u\n", version, vm_domid, port);
	if (version != 1 || vm_domid != (uint32_t)vm)
		return fail("unexpected offer");

	/* 2. bind the offered port; drain the event Xen raises on the binding side */
	struct ioctl_evtchn_bind_interdomain bi = { .remote_domain = vm, .remote_port = port };
	int lport = ioctl(ev, IOCTL_EVTCHN_BIND_INTERDOMAIN, &bi);
	if (lport < 0)
		return fail("IOCTL_EVTCHN_BIND_INTERDOMAIN");
	while (wait_event(50))
		;

	/* 3. the mailbox: a gntalloc page granted to the VM */
	struct ioctl_gntalloc_alloc_gref ag = { .domid = vm, .flags = GNTALLOC_FLAG_WRITABLE, .count = 1 };
	if (ioctl(ga, IOCTL_GNTALLOC_ALLOC_GREF, &ag) < 0)
		return fail("IOCTL_GNTALLOC_ALLOC_GREF");
	void *mbp = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, ga, ag.index);
	if (mbp == MAP_FAILED)
		return fail("mmap of the gntalloc page");
	volatile void *mb = mbp;
	*word(mb, 0) = MAILBOX_MAGIC;

	/* 4. answer with a reference that grants nothing (beyond Linux's one-frame grant table):
	 * the VM must say STATUS_MAP_FAILED (2); then answer with the mailbox's reference: the VM
	 * switches to it and says STATUS_SERVING (1). Each time: notify, wait for the status. */
	struct ioctl_evtchn_notify nt = { .port = lport };
	uint32_t answers[2] = { 4095, ag.gref_ids[0] }, want[2] = { 2, 1 };
	for (int k = 0; k < 2; k++) {
		*word(rv, 16) = answers[k];
		__sync_synchronize();
		*word(rv, 20) = GUEST_MAGIC;
		if (ioctl(ev, IOCTL_EVTCHN_NOTIFY, &nt) < 0)
			return fail("IOCTL_EVTCHN_NOTIFY");
		t0 = now();
		while (*word(rv, 24) != want[k] && now() - t0 < 5)
			wait_event(100);
		uint32_t status = *word(rv, 24);
		printf("rv-probe: answered grant %u, status %u\n", answers[k], status);
		if (status != want[k])
			return fail(k ? "the Trusty VM does not serve the mailbox" : "the Trusty VM did not refuse a reference never granted");
	}

	/* 5. one fast call through the mailbox; the VM signals its answer */
	volatile uint64_t *req = (volatile uint64_t *)((volatile char *)mb + 16);
	volatile uint64_t *rsp = (volatile uint64_t *)((volatile char *)mb + 80);
	req[0] = FC_API_VERSION;
	req[1] = 3;
	__sync_synchronize();
	*word(mb, 4) = 1;
	if (ioctl(ev, IOCTL_EVTCHN_NOTIFY, &nt) < 0)
		return fail("IOCTL_EVTCHN_NOTIFY");
	int events = 0;
	t0 = now();
	while (*word(mb, 8) != 1 && now() - t0 < 5)
		events += wait_event(100);
	if (*word(mb, 8) != 1)
		return fail("no answer in the mailbox within 5 s");
	__sync_synchronize();
	events += wait_event(500);
	printf("rv-probe: SMC_FC_API_VERSION(3) -> %lld, %d event(s)\n", (long long)(int64_t)rsp[0], events);
	if (!events)
		return fail("the Trusty VM did not signal its answer");
	printf("rv-probe: PASS\n");
	return 0;
}
