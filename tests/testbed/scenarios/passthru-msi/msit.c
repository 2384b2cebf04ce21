/* msit: plain MSI from QEMU's edu device (1234:11e8), driven from L2's userspace with no driver.
 * The Debian cloud kernel has CONFIG_VFIO_NOIOMMU unset, so L2 cannot use VFIO without an IOMMU;
 * instead msit programs edu's MSI capability itself (through sysfs config space) with the
 * message of an interrupt L2's kernel already handles: MSI-X entry 0 (virtio's config vector)
 * of a donor virtio function. Each edu raise (BAR0 0x60) must then add one to that IRQ's count
 * in /proc/interrupts.
 *   msit EDU_BDF DONOR_BDF IRQNAME
 * prints  MSIT liveness=ok msi-cap=0x.. msi64=N msi-vectors=V msi-enabled=1 raised=20
 *         received=R timeouts=T status-ok=S   (or MSIT error=...) */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define N_RAISE 20

static void die(const char *what) {
    printf("MSIT error=%s errno=%d\n", what, errno);
    fflush(stdout);
    exit(1);
}

static int cfg_open(const char *bdf) {
    char p[256];
    snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/config", bdf);
    int fd = open(p, O_RDWR);
    if (fd < 0) die("open-config");
    return fd;
}
static uint32_t cfg_rd(int fd, int off, int len) {
    uint32_t v = 0;
    if (pread(fd, &v, len, off) != len) die("config-read");
    return v;
}
static void cfg_wr(int fd, int off, int len, uint32_t v) {
    if (pwrite(fd, &v, len, off) != len) die("config-write");
}
static int find_cap(int fd, int id) {
    if (!(cfg_rd(fd, 0x06, 2) & 0x10)) return 0;
    int p = cfg_rd(fd, 0x34, 1) & 0xfc, n = 0;
    while (p && n++ < 48) {
        if ((int)cfg_rd(fd, p, 1) == id) return p;
        p = cfg_rd(fd, p + 1, 1) & 0xfc;
    }
    return 0;
}
static volatile uint32_t *map_bar(const char *bdf, int bar, size_t *len) {
    char p[256];
    snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/resource%d", bdf, bar);
    int fd = open(p, O_RDWR | O_SYNC);
    if (fd < 0) die("open-resource");
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_size <= 0) die("resource-size");
    off_t sz = st.st_size;
    void *m = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) die("mmap-resource");
    *len = sz;
    return m;
}
/* The IRQ's count (all CPUs) from the /proc/interrupts line whose last field is name. */
static long irq_count(const char *name) {
    FILE *f = fopen("/proc/interrupts", "r");
    if (!f) die("proc-interrupts");
    char line[1024];
    long total = -1;
    while (fgets(line, sizeof line, f)) {
        char *end = line + strlen(line);
        while (end > line && (end[-1] == '\n' || end[-1] == ' ')) *--end = 0;
        size_t nl = strlen(name);
        if ((size_t)(end - line) < nl || strcmp(end - nl, name) || (end - nl > line && end[-nl - 1] != ' '))
            continue;
        char *c = strchr(line, ':');
        if (!c) continue;
        total = 0;
        for (char *s = c + 1;;) {
            char *e;
            long v = strtol(s, &e, 10);
            if (e == s) break;
            total += v;
            s = e;
        }
        break;
    }
    fclose(f);
    return total;
}
static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000L + t.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 4) { printf("MSIT error=usage\n"); return 2; }
    const char *edu = argv[1], *donor = argv[2], *irq = argv[3];

    /* The donor's message: MSI-X table entry 0 (virtio's config vector). */
    int dfd = cfg_open(donor);
    int xcap = find_cap(dfd, 0x11);
    if (!xcap) die("donor-no-msix");
    uint32_t tbl = cfg_rd(dfd, xcap + 4, 4);
    size_t dlen;
    volatile uint32_t *dbar = map_bar(donor, tbl & 7, &dlen);
    volatile uint32_t *ent = dbar + (tbl & ~7u) / 4;
    uint32_t alo = ent[0], ahi = ent[1], data = ent[2], vctl = ent[3];
    printf("MSIT donor=%s irq=%s msix-ctl=%#x addr=%#x:%#x data=%#x masked=%u\n", donor, irq,
           cfg_rd(dfd, xcap + 2, 2), ahi, alo, data, vctl & 1);
    if ((alo & 0xfff00000u) != 0xfee00000u) die("donor-message-not-apic");
    if (irq_count(irq) < 0) die("donor-irq-not-found");

    /* edu: memory decoding and bus mastering on, MSI with the donor's message. */
    int efd = cfg_open(edu);
    printf("MSIT edu=%s id=%04x:%04x class=%06x\n", edu, cfg_rd(efd, 0, 2), cfg_rd(efd, 2, 2),
           cfg_rd(efd, 8, 4) >> 8);
    cfg_wr(efd, 0x04, 2, cfg_rd(efd, 0x04, 2) | 0x6);
    size_t elen;
    volatile uint32_t *bar = map_bar(edu, 0, &elen);
    bar[0x04 / 4] = 0x12345678;
    uint32_t live = bar[0x04 / 4];
    const char *liveness = live == ~0x12345678u ? "ok" : "bad";
    int cap = find_cap(efd, 0x05);
    if (!cap) { printf("MSIT liveness=%s error=no-msi-cap\n", liveness); return 1; }
    uint32_t ctl = cfg_rd(efd, cap + 2, 2);
    int is64 = !!(ctl & 0x80);
    int vectors = 1 << ((ctl >> 1) & 7);
    cfg_wr(efd, cap + 2, 2, ctl & ~0x71u); /* off, one vector */
    cfg_wr(efd, cap + 4, 4, alo);
    if (is64) cfg_wr(efd, cap + 8, 4, ahi);
    cfg_wr(efd, cap + (is64 ? 12 : 8), 2, data);
    cfg_wr(efd, cap + 2, 2, (ctl & ~0x71u) | 1);
    uint32_t ctl_on = cfg_rd(efd, cap + 2, 2);
    printf("MSIT msi-cap=%#x ctl=%#x -> %#x readback addr=%#x data=%#x\n", cap, ctl, ctl_on,
           cfg_rd(efd, cap + 4, 4), cfg_rd(efd, cap + (is64 ? 12 : 8), 2));

    int received = 0, timeouts = 0, status_ok = 0;
    long worst = 0;
    for (int i = 0; i < N_RAISE; i++) {
        uint32_t bit = 1u << (i % 8);
        long c0 = irq_count(irq), t0 = now_ms(), c = c0;
        bar[0x60 / 4] = bit;
        while ((c = irq_count(irq)) == c0 && now_ms() - t0 < 2000) usleep(1000);
        long dt = now_ms() - t0;
        if (c > c0) { received++; if (dt > worst) worst = dt; }
        else timeouts++;
        uint32_t st = bar[0x24 / 4];
        if (st & bit) status_ok++;
        bar[0x64 / 4] = st;
        if (c - c0 > 1) printf("MSIT note=raise-%d-counted-%ld\n", i, c - c0);
    }
    uint32_t st_end = bar[0x24 / 4];
    cfg_wr(efd, cap + 2, 2, ctl_on & ~1u); /* MSI off again */
    printf("MSIT liveness=%s msi-vectors=%d msi64=%d msi-enabled=%u raised=%d received=%d "
           "timeouts=%d status-ok=%d status-end=%#x worst-ms=%ld msi-off-ctl=%#x\n",
           liveness, vectors, is64, ctl_on & 1, N_RAISE, received, timeouts, status_ok, st_end,
           worst, cfg_rd(efd, cap + 2, 2));
    return 0;
}
