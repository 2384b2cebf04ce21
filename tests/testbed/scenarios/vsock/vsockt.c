/*
 * vsockt: the vsock test bed scenario's test tool (one static binary, in L1 and in L2).
 * Built by prepare-host: gcc -static -O2 -std=c99 -o vsockt vsockt.c
 *
 *   vsockt [-r] [-t SECS] [-w SECS] MODE ARGS...
 *     -r        send: retry connecting every 200 ms within -w (the QEMU baseline's L1 side)
 *     -t SECS   deadline of one transfer (default 60): a stall prints a result line and fails
 *     -w SECS   window for connecting / being connected (default 60)
 *
 * Modes (every mode ends with exactly one "VSOCKT <mode> ... result=WORD" line per
 * connection on stdout, written with a single write(2), and exits 0 only on success):
 *   L2 (AF_VSOCK):
 *     local-cid                     print the guest's CID (/dev/vsock ioctl)
 *     echo-server PORT [COUNT [BYTES]]
 *                                   listen on VMADDR_CID_ANY:PORT, serve COUNT connections
 *                                   (0: forever) one at a time, echo every byte until the
 *                                   peer's EOF, keep sending what is left after it, close;
 *                                   with BYTES, also check the incoming stream is BYTES of
 *                                   the pattern for PORT
 *     send CID PORT BYTES           connect, send BYTES of the pattern for PORT while reading
 *                                   the echo, shutdown(SHUT_WR), read until EOF (or, once
 *                                   the whole echo arrived, 3 s more for EOF: peer-eof=no is
 *                                   reported, not failed); the echo must equal the pattern
 *     probe CID PORT                connect where nothing listens: result=refused expected
 *   L1 (unix socket, Firecracker's vsock host protocol):
 *     uds-connect PATH PORT BYTES   connect to PATH, "CONNECT PORT\n", read "OK N\n" (byte
 *                                   by byte); closed without OK (nothing listens in the
 *                                   guest yet) or no socket: retry every 200 ms within -w;
 *                                   then as send, but EOF after the echo is required
 *     uds-echo PATH [PORT BYTES]    bind+listen on PATH, accept one connection, echo as
 *                                   echo-server does; with PORT BYTES check the stream
 *
 * The pattern: byte i of the stream for port P is byte (i % 8) of splitmix64(seed(P) + i / 8);
 * hashes are FNV-1a 64 computed here. Result words: match/ok (success), refused (probe's
 * success), mismatch (first-bad=OFFSET want= got=), short (EOF before all bytes), long,
 * timeout (with the counters at the time), error (what= errno=), no-connection, bad-reply.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define CHUNK 65536

static double opt_timeout = 60, opt_window = 60;
static int opt_retry;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void say(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    int n;
    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    (void)!write(1, buf, (size_t)n);
}

static const char *errname(int e)
{
    switch (e) {
    case 0: return "0";
    case ECONNRESET: return "ECONNRESET";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EPIPE: return "EPIPE";
    case ENOENT: return "ENOENT";
    case ENODEV: return "ENODEV";
    case EINVAL: return "EINVAL";
    case ENOTCONN: return "ENOTCONN";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case EADDRINUSE: return "EADDRINUSE";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ENETUNREACH: return "ENETUNREACH";
    case EINTR: return "EINTR";
    default: {
        static char b[32];
        snprintf(b, sizeof b, "errno%d", e);
        return b;
    }
    }
}

/* ---- pattern and hash ------------------------------------------------------------------ */

static uint64_t mix64(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t seed_for(unsigned port)
{
    return 0x7268797665767363ull ^ ((uint64_t)port << 32); /* "rhyvevsc" */
}

static uint8_t pat_byte(uint64_t seed, uint64_t i)
{
    return (uint8_t)(mix64(seed + (i >> 3)) >> ((i & 7) * 8));
}

static void pat_fill(uint64_t seed, uint64_t off, uint8_t *buf, size_t n)
{
    uint64_t v = 0;
    size_t j;
    for (j = 0; j < n; j++) {
        uint64_t i = off + j;
        if (j == 0 || (i & 7) == 0)
            v = mix64(seed + (i >> 3));
        buf[j] = (uint8_t)(v >> ((i & 7) * 8));
    }
}

#define FNV_INIT 0xcbf29ce484222325ull
static uint64_t fnv(uint64_t h, const uint8_t *p, size_t n)
{
    while (n--) {
        h ^= *p++;
        h *= 0x100000001b3ull;
    }
    return h;
}

/* Incoming-stream check against the pattern: first differing offset. */
struct check {
    int on;
    uint64_t seed;
    int64_t bad_at;
    uint8_t want, got;
};

static void check_bytes(struct check *c, uint64_t off, const uint8_t *p, size_t n)
{
    size_t j;
    if (!c->on || c->bad_at >= 0)
        return;
    for (j = 0; j < n; j++) {
        uint8_t w = pat_byte(c->seed, off + j);
        if (p[j] != w) {
            c->bad_at = (int64_t)(off + j);
            c->want = w;
            c->got = p[j];
            return;
        }
    }
}

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static int poll_ms(double deadline)
{
    double left = deadline - now_s();
    if (left <= 0)
        return 0;
    if (left > 1000)
        left = 1000;
    return (int)(left * 1000) + 1;
}

/* ---- send a pattern, read it back ------------------------------------------------------ */

struct xfer {
    uint64_t bytes, seed;
    uint64_t sent, recv;
    uint64_t fnv_sent, fnv_recv;
    struct check chk;
    int eof, shut, timed_out, err;
    const char *err_what;
    double t0, t_end;
};

/* Sends x->bytes of the pattern while reading; shutdown(SHUT_WR) after the last byte; reads
 * until EOF. need_eof=0: once all bytes came back, waits at most 3 s more for EOF. */
static void transfer(int fd, struct xfer *x, int need_eof)
{
    static uint8_t out[CHUNK], in[CHUNK];
    size_t out_len = 0, out_off = 0;
    uint64_t gen = 0;
    double deadline, grace = 0;

    set_nonblock(fd);
    x->fnv_sent = x->fnv_recv = FNV_INIT;
    x->chk.on = 1;
    x->chk.seed = x->seed;
    x->chk.bad_at = -1;
    x->t0 = now_s();
    deadline = x->t0 + opt_timeout;
    for (;;) {
        struct pollfd pfd;
        double t = now_s(), lim = deadline;
        int r;

        if (!x->shut && x->sent == x->bytes) {
            if (shutdown(fd, SHUT_WR) < 0) {
                x->err = errno;
                x->err_what = "shutdown";
                break;
            }
            x->shut = 1;
        }
        if (x->shut && x->eof)
            break;
        if (x->recv > x->bytes || x->chk.bad_at >= 0)
            break; /* no point going on */
        if (!need_eof && x->shut && x->recv == x->bytes) {
            if (grace == 0)
                grace = t + 3;
            if (t >= grace)
                break;
            if (grace < lim)
                lim = grace;
        }
        if (t >= deadline) {
            x->timed_out = 1;
            break;
        }
        pfd.fd = fd;
        pfd.events = (short)((x->eof ? 0 : POLLIN) | (x->shut ? 0 : POLLOUT));
        pfd.revents = 0;
        r = poll(&pfd, 1, poll_ms(lim));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            x->err = errno;
            x->err_what = "poll";
            break;
        }
        if (r == 0)
            continue;
        if (!x->eof && (pfd.revents & (POLLIN | POLLHUP | POLLERR))) {
            ssize_t n = read(fd, in, sizeof in);
            if (n > 0) {
                check_bytes(&x->chk, x->recv, in, (size_t)n);
                x->fnv_recv = fnv(x->fnv_recv, in, (size_t)n);
                x->recv += (uint64_t)n;
            } else if (n == 0) {
                x->eof = 1;
            } else if (errno != EAGAIN && errno != EINTR) {
                x->err = errno;
                x->err_what = "read";
                break;
            }
        }
        if (!x->shut && (pfd.revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t n;
            if (out_off == out_len) {
                uint64_t left = x->bytes - gen;
                out_len = left < CHUNK ? (size_t)left : CHUNK;
                pat_fill(x->seed, gen, out, out_len);
                gen += out_len;
                out_off = 0;
            }
            n = write(fd, out + out_off, out_len - out_off);
            if (n > 0) {
                x->fnv_sent = fnv(x->fnv_sent, out + out_off, (size_t)n);
                x->sent += (uint64_t)n;
                out_off += (size_t)n;
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                x->err = errno;
                x->err_what = "write";
                break;
            }
        }
    }
    x->t_end = now_s();
}

/* Prints the result line; returns 0 on a match. */
static int report_xfer(const char *mode, const char *who, struct xfer *x, int need_eof)
{
    char detail[256] = "";
    const char *res;

    if (x->err) {
        res = "error";
        snprintf(detail, sizeof detail, " what=%s errno=%s", x->err_what, errname(x->err));
    } else if (x->chk.bad_at >= 0) {
        res = "mismatch";
        snprintf(detail, sizeof detail, " first-bad=%lld want=0x%02x got=0x%02x",
                 (long long)x->chk.bad_at, x->chk.want, x->chk.got);
    } else if (x->recv > x->bytes) {
        res = "long";
    } else if (x->timed_out && x->recv == x->bytes && x->sent == x->bytes) {
        res = "no-eof"; /* everything came back, the peer's EOF did not */
        snprintf(detail, sizeof detail, " after=%.0fs", opt_timeout);
    } else if (x->timed_out) {
        res = "timeout";
        snprintf(detail, sizeof detail, " after=%.0fs shut-wr=%s", opt_timeout,
                 x->shut ? "yes" : "no");
    } else if (x->recv < x->bytes || x->sent < x->bytes) {
        res = "short";
    } else if (need_eof && !x->eof) {
        res = "no-eof";
    } else if (x->fnv_recv != x->fnv_sent) {
        res = "mismatch"; /* cannot happen with the byte check, kept as a guard */
    } else {
        res = "match";
    }
    say("VSOCKT %s %s bytes=%llu sent=%llu sent-fnv=%016llx recv=%llu recv-fnv=%016llx "
        "peer-eof=%s ms=%.0f result=%s%s",
        mode, who, (unsigned long long)x->bytes, (unsigned long long)x->sent,
        (unsigned long long)x->fnv_sent, (unsigned long long)x->recv,
        (unsigned long long)x->fnv_recv, x->eof ? "yes" : "no", (x->t_end - x->t0) * 1000, res,
        detail);
    return strcmp(res, "match") == 0 ? 0 : 1;
}

/* ---- echo ------------------------------------------------------------------------------ */

struct echo {
    uint64_t in, out, fnv_in;
    struct check chk;
    uint64_t expect; /* 0: unknown */
    int eof, timed_out, err;
    const char *err_what;
    double t0, t_end;
};

static void echo_loop(int fd, struct echo *e)
{
    static uint8_t buf[4 * CHUNK];
    size_t len = 0, off = 0;
    double deadline;

    set_nonblock(fd);
    e->fnv_in = FNV_INIT;
    e->t0 = now_s();
    deadline = e->t0 + opt_timeout;
    for (;;) {
        struct pollfd pfd;
        int r;
        if (e->eof && off == len)
            break;
        if (now_s() >= deadline) {
            e->timed_out = 1;
            break;
        }
        if (off > 0 && len == sizeof buf) {
            memmove(buf, buf + off, len - off);
            len -= off;
            off = 0;
        }
        pfd.fd = fd;
        pfd.events = (short)((!e->eof && len < sizeof buf ? POLLIN : 0) | (len > off ? POLLOUT : 0));
        pfd.revents = 0;
        r = poll(&pfd, 1, poll_ms(deadline));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            e->err = errno;
            e->err_what = "poll";
            break;
        }
        if (r == 0)
            continue;
        if (!e->eof && len < sizeof buf && (pfd.revents & (POLLIN | POLLHUP | POLLERR))) {
            ssize_t n = read(fd, buf + len, sizeof buf - len);
            if (n > 0) {
                check_bytes(&e->chk, e->in, buf + len, (size_t)n);
                e->fnv_in = fnv(e->fnv_in, buf + len, (size_t)n);
                e->in += (uint64_t)n;
                len += (size_t)n;
            } else if (n == 0) {
                e->eof = 1;
            } else if (errno != EAGAIN && errno != EINTR) {
                e->err = errno;
                e->err_what = "read";
                break;
            }
        }
        if (len > off && (pfd.revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t n = write(fd, buf + off, len - off);
            if (n > 0) {
                e->out += (uint64_t)n;
                off += (size_t)n;
                if (off == len)
                    off = len = 0;
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                e->err = errno;
                e->err_what = "write";
                break;
            }
        }
    }
    e->t_end = now_s();
}

static int report_echo(const char *mode, const char *who, struct echo *e)
{
    char detail[256] = "";
    const char *res;
    if (e->err) {
        res = "error";
        snprintf(detail, sizeof detail, " what=%s errno=%s", e->err_what, errname(e->err));
    } else if (e->chk.on && e->chk.bad_at >= 0) {
        res = "mismatch";
        snprintf(detail, sizeof detail, " first-bad=%lld want=0x%02x got=0x%02x",
                 (long long)e->chk.bad_at, e->chk.want, e->chk.got);
    } else if (e->timed_out) {
        res = "timeout";
        snprintf(detail, sizeof detail, " after=%.0fs", opt_timeout);
    } else if (e->in != e->out || (e->expect && e->in != e->expect)) {
        res = "short";
    } else {
        res = "ok";
    }
    say("VSOCKT %s %s in=%llu out=%llu in-fnv=%016llx%s peer-eof=%s ms=%.0f result=%s%s", mode,
        who, (unsigned long long)e->in, (unsigned long long)e->out,
        (unsigned long long)e->fnv_in, e->chk.on ? " in-pattern=checked" : "",
        e->eof ? "yes" : "no", (e->t_end - e->t0) * 1000, res, detail);
    return strcmp(res, "ok") == 0 ? 0 : 1;
}

static void echo_init(struct echo *e, unsigned port, uint64_t expect)
{
    memset(e, 0, sizeof *e);
    e->expect = expect;
    e->chk.on = expect != 0;
    e->chk.seed = seed_for(port);
    e->chk.bad_at = -1;
}

/* Waits for a connection on a listening socket within the window; -1 on timeout. */
static int accept_within(int lfd, double deadline)
{
    for (;;) {
        struct pollfd pfd = { lfd, POLLIN, 0 };
        int r;
        if (now_s() >= deadline)
            return -1;
        r = poll(&pfd, 1, poll_ms(deadline));
        if (r > 0) {
            int fd = accept(lfd, NULL, NULL);
            if (fd >= 0)
                return fd;
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                return -2;
        } else if (r < 0 && errno != EINTR) {
            return -2;
        }
    }
}

/* ---- modes ----------------------------------------------------------------------------- */

static unsigned parse_u(const char *s, const char *what)
{
    char *end;
    unsigned long v = strtoul(s, &end, 0);
    if (!*s || *end) {
        fprintf(stderr, "vsockt: bad %s: %s\n", what, s);
        exit(2);
    }
    return (unsigned)v;
}

static uint64_t parse_u64(const char *s, const char *what)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 0);
    if (!*s || *end) {
        fprintf(stderr, "vsockt: bad %s: %s\n", what, s);
        exit(2);
    }
    return (uint64_t)v;
}

static int mode_local_cid(void)
{
    unsigned int cid = 0;
    int fd = open("/dev/vsock", O_RDONLY);
    if (fd < 0 || ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0) {
        say("VSOCKT local-cid result=error errno=%s", errname(errno));
        return 1;
    }
    close(fd);
    say("VSOCKT local-cid cid=%u result=ok", cid);
    return 0;
}

static int vsock_connect(unsigned cid, unsigned port, int *err)
{
    struct sockaddr_vm sa;
    struct timeval tv = { 10, 0 };
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) {
        *err = errno;
        return -1;
    }
    setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof tv);
    memset(&sa, 0, sizeof sa);
    sa.svm_family = AF_VSOCK;
    sa.svm_cid = cid;
    sa.svm_port = port;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        *err = errno;
        close(fd);
        return -1;
    }
    return fd;
}

static int mode_send(unsigned cid, unsigned port, uint64_t bytes)
{
    struct xfer x;
    struct sockaddr_vm me;
    socklen_t ml = sizeof me;
    char who[96];
    int err = 0, fd, rc;
    double t0 = now_s();

    unsigned attempts = 0;

    for (;;) {
        attempts++;
        fd = vsock_connect(cid, port, &err);
        if (fd >= 0)
            break;
        if (!opt_retry || now_s() + 0.2 >= t0 + opt_window) {
            say("VSOCKT send cid=%u port=%u attempts=%u connect-ms=%.0f result=error "
                "what=connect errno=%s", cid, port, attempts, (now_s() - t0) * 1000,
                errname(err));
            return 1;
        }
        usleep(200000);
    }
    memset(&me, 0, sizeof me);
    getsockname(fd, (struct sockaddr *)&me, &ml);
    /* (an autobound socket's own CID reads as VMADDR_CID_ANY: only the port is shown) */
    snprintf(who, sizeof who, "cid=%u port=%u local-port=%u attempts=%u connect-ms=%.0f", cid,
             port, me.svm_port, attempts, (now_s() - t0) * 1000);
    memset(&x, 0, sizeof x);
    x.bytes = bytes;
    x.seed = seed_for(port);
    transfer(fd, &x, 0);
    rc = report_xfer("send", who, &x, 0);
    close(fd);
    return rc;
}

static int mode_probe(unsigned cid, unsigned port)
{
    int err = 0, fd;
    double t0 = now_s();
    fd = vsock_connect(cid, port, &err);
    if (fd >= 0) {
        say("VSOCKT probe cid=%u port=%u result=connected", cid, port);
        close(fd);
        return 1;
    }
    say("VSOCKT probe cid=%u port=%u ms=%.0f result=%s errno=%s", cid, port,
        (now_s() - t0) * 1000,
        err == ECONNRESET || err == ECONNREFUSED ? "refused" : "error", errname(err));
    return err == ECONNRESET || err == ECONNREFUSED ? 0 : 1;
}

static int mode_echo_server(unsigned port, unsigned count, uint64_t expect)
{
    struct sockaddr_vm sa;
    unsigned served = 0;
    int lfd, failed = 0;

    lfd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (lfd < 0) {
        say("VSOCKT echo-server port=%u result=error what=socket errno=%s", port, errname(errno));
        return 1;
    }
    memset(&sa, 0, sizeof sa);
    sa.svm_family = AF_VSOCK;
    sa.svm_cid = VMADDR_CID_ANY;
    sa.svm_port = port;
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 4) < 0) {
        say("VSOCKT echo-server port=%u result=error what=bind errno=%s", port, errname(errno));
        return 1;
    }
    say("VSOCKT echo-server listening port=%u", port);
    while (count == 0 || served < count) {
        struct sockaddr_vm peer;
        socklen_t pl = sizeof peer;
        struct echo e;
        char who[96];
        int fd = accept_within(lfd, now_s() + opt_window);
        if (fd < 0) {
            say("VSOCKT echo-server port=%u served=%u result=%s after=%.0fs", port, served,
                fd == -1 ? "no-connection" : "error", opt_window);
            return 1;
        }
        served++;
        memset(&peer, 0, sizeof peer);
        getpeername(fd, (struct sockaddr *)&peer, &pl);
        snprintf(who, sizeof who, "port=%u conn=%u peer=%u:%u", port, served, peer.svm_cid,
                 peer.svm_port);
        echo_init(&e, port, expect);
        echo_loop(fd, &e);
        close(fd);
        failed |= report_echo("echo-server", who, &e);
    }
    close(lfd);
    return failed;
}

static int unix_addr(struct sockaddr_un *sa, const char *path)
{
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sa->sun_path) {
        fprintf(stderr, "vsockt: path too long: %s\n", path);
        exit(2);
    }
    strcpy(sa->sun_path, path);
    return 0;
}

static int mode_uds_echo(const char *path, unsigned port, uint64_t expect)
{
    struct sockaddr_un sa;
    struct echo e;
    char who[160];
    int lfd, fd, rc;

    unix_addr(&sa, path);
    unlink(path);
    lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 4) < 0) {
        say("VSOCKT uds-echo path=%s result=error what=bind errno=%s", path, errname(errno));
        return 1;
    }
    say("VSOCKT uds-echo listening path=%s", path);
    fd = accept_within(lfd, now_s() + opt_window);
    if (fd < 0) {
        say("VSOCKT uds-echo path=%s result=%s after=%.0fs", path,
            fd == -1 ? "no-connection" : "error", opt_window);
        return 1;
    }
    close(lfd);
    snprintf(who, sizeof who, "path=%s", path);
    echo_init(&e, port, expect);
    echo_loop(fd, &e);
    close(fd);
    rc = report_echo("uds-echo", who, &e);
    unlink(path);
    return rc;
}

/* One handshake attempt: 1 and the connected fd on OK; 0 retry (reason set); -1 fatal. */
static int uds_handshake(const char *path, unsigned port, int *out_fd, char *reply, size_t rsz,
                         const char **reason, double window_end)
{
    struct sockaddr_un sa;
    char req[32];
    size_t got = 0;
    double deadline = now_s() + 10;
    int fd, n;

    if (deadline > window_end)
        deadline = window_end;
    unix_addr(&sa, path);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) {
        *reason = "socket";
        return -1;
    }
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        *reason = errno == ENOENT ? "no-socket" : errno == ECONNREFUSED ? "refused" : "connect-error";
        close(fd);
        return 0;
    }
    n = snprintf(req, sizeof req, "CONNECT %u\n", port);
    if (write(fd, req, (size_t)n) != n) {
        *reason = "write-error";
        close(fd);
        return 0;
    }
    for (;;) {
        struct pollfd pfd = { fd, POLLIN, 0 };
        char c;
        ssize_t r;
        if (now_s() >= deadline) {
            *reason = "no-reply";
            close(fd);
            return 0;
        }
        if (poll(&pfd, 1, poll_ms(deadline)) <= 0)
            continue;
        r = read(fd, &c, 1);
        if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN)) {
            *reason = got ? "closed-mid-reply" : "closed-without-ok";
            close(fd);
            return 0;
        }
        if (r < 0)
            continue;
        if (c == '\n')
            break;
        if (got + 1 < rsz)
            reply[got++] = c;
        else {
            reply[got] = 0;
            close(fd);
            return -1;
        }
    }
    reply[got] = 0;
    if (strncmp(reply, "OK ", 3) != 0) {
        close(fd);
        return -1;
    }
    *out_fd = fd;
    return 1;
}

static int mode_uds_connect(const char *path, unsigned port, uint64_t bytes)
{
    double t0 = now_s(), window_end = t0 + opt_window;
    const char *reason = "none";
    char reply[64] = "", who[256];
    unsigned attempts = 0;
    struct xfer x;
    int fd = -1, r, rc;

    for (;;) {
        attempts++;
        r = uds_handshake(path, port, &fd, reply, sizeof reply, &reason, window_end);
        if (r == 1)
            break;
        if (r < 0) {
            say("VSOCKT uds-connect path=%s port=%u attempts=%u result=bad-reply reply='%s'",
                path, port, attempts, reply);
            return 1;
        }
        if (now_s() + 0.2 >= window_end) {
            say("VSOCKT uds-connect path=%s port=%u attempts=%u last=%s result=no-connection "
                "after=%.0fs", path, port, attempts, reason, opt_window);
            return 1;
        }
        usleep(200000);
    }
    snprintf(who, sizeof who, "path=%s port=%u attempts=%u last-retry=%s reply='%s' connect-ms=%.0f",
             path, port, attempts, attempts > 1 ? reason : "none", reply, (now_s() - t0) * 1000);
    memset(&x, 0, sizeof x);
    x.bytes = bytes;
    x.seed = seed_for(port);
    transfer(fd, &x, 1);
    rc = report_xfer("uds-connect", who, &x, 1);
    close(fd);
    return rc;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: vsockt [-r] [-t SECS] [-w SECS] MODE ARGS\n"
            "  local-cid | echo-server PORT [COUNT [BYTES]] | send CID PORT BYTES | probe CID PORT\n"
            "  uds-connect PATH PORT BYTES | uds-echo PATH [PORT BYTES]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int i = 1;
    const char *m;

    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IONBF, 0);
    while (i + 1 < argc && argv[i][0] == '-') {
        if (strcmp(argv[i], "-r") == 0) {
            opt_retry = 1;
            i++;
            continue;
        }
        if (strcmp(argv[i], "-t") == 0)
            opt_timeout = atof(argv[i + 1]);
        else if (strcmp(argv[i], "-w") == 0)
            opt_window = atof(argv[i + 1]);
        else
            usage();
        i += 2;
    }
    if (i >= argc)
        usage();
    m = argv[i++];
    argc -= i;
    argv += i;
    if (strcmp(m, "local-cid") == 0 && argc == 0)
        return mode_local_cid();
    if (strcmp(m, "echo-server") == 0 && argc >= 1 && argc <= 3)
        return mode_echo_server(parse_u(argv[0], "port"), argc > 1 ? parse_u(argv[1], "count") : 0,
                                argc > 2 ? parse_u64(argv[2], "bytes") : 0);
    if (strcmp(m, "send") == 0 && argc == 3)
        return mode_send(parse_u(argv[0], "cid"), parse_u(argv[1], "port"),
                         parse_u64(argv[2], "bytes"));
    if (strcmp(m, "probe") == 0 && argc == 2)
        return mode_probe(parse_u(argv[0], "cid"), parse_u(argv[1], "port"));
    if (strcmp(m, "uds-connect") == 0 && argc == 3)
        return mode_uds_connect(argv[0], parse_u(argv[1], "port"), parse_u64(argv[2], "bytes"));
    if (strcmp(m, "uds-echo") == 0 && (argc == 1 || argc == 3))
        return mode_uds_echo(argv[0], argc == 3 ? parse_u(argv[1], "port") : 0,
                             argc == 3 ? parse_u64(argv[2], "bytes") : 0);
    usage();
    return 2;
}
