/* secmig's Linux guest workload: dirties memory and sends UDP traffic, each at a set rate.
 *
 * Started by the initramfs's /init once eth0 is configured. Reads its parameters from the kernel
 * command line (/proc/cmdline), every one optional:
 *
 *   secmig.ws=MIB           working set in MiB (default 64), filled once before the workload starts
 *   secmig.dirty=N          pages written per second across the working set (default 5000); 0 = none,
 *                           max = as fast as the vCPU goes
 *   secmig.pattern=P        seq (a cyclic sweep, default), rand (uniformly random pages) or hot (90 % of
 *                           the writes on the first eighth of the working set, the rest uniformly on it all)
 *   secmig.udp=IP:PORT      where the UDP datagrams go (default: no traffic)
 *   secmig.udp_rate=N       UDP payload bytes per second (default 0 = no traffic)
 *   secmig.udp_size=N       payload bytes per datagram (default 1024, 32..65507)
 *   secmig.report=S         print a counters line every S seconds (default 0 = never)
 *
 * Both rates are paced against the monotonic clock; a backlog (after the VM was paused, say) is
 * dropped beyond 100 ms of work, so a resumed guest does not burst. Each datagram starts with
 * "SMGU", a 64-bit sequence number and the guest's monotonic send time in ns (little endian).
 *
 * When the working set is filled it prints one line the host waits for:
 *   secmig-guest: ready ip=... mac=... ws_mib=... dirty_pages_per_s=... udp=... udp_bytes_per_s=...
 * Errors are lines starting "secmig-guest: error".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define BACKLOG_NS 100000000ull /* at most 100 ms of work is caught up */
#define TICK_NS 1000000l        /* 1 ms between pacing checks */

struct params {
    uint64_t ws_mib;
    uint64_t dirty_pages_per_s; /* 0 = none */
    int dirty_max;
    char udp_host[64];
    uint16_t udp_port;
    uint64_t udp_bytes_per_s;
    uint64_t udp_size;
    uint64_t report_s;
    char ip[64];
    int pattern; /* 0 seq, 1 rand, 2 hot */
};

static void say(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t w = write(1, buf, (size_t)n);
    (void)w;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int parse_u64(const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end) return -1;
    *out = v;
    return 0;
}

static int parse_cmdline(struct params *p) {
    char buf[4096];
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0) {
        say("secmig-guest: error cannot open /proc/cmdline: %s", strerror(errno));
        return -1;
    }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0) n = 0;
    buf[n] = 0;
    for (char *save = NULL, *w = strtok_r(buf, " \t\n", &save); w; w = strtok_r(NULL, " \t\n", &save)) {
        if (strncmp(w, "secmig.", 7)) continue;
        char *key = w + 7, *val = strchr(key, '=');
        if (!val) continue;
        *val++ = 0;
        int bad = 0;
        if (!strcmp(key, "ws")) bad = parse_u64(val, &p->ws_mib) || p->ws_mib == 0;
        else if (!strcmp(key, "dirty")) {
            if (!strcmp(val, "max")) p->dirty_max = 1;
            else bad = parse_u64(val, &p->dirty_pages_per_s);
        } else if (!strcmp(key, "udp")) {
            char *colon = strrchr(val, ':');
            uint64_t port = 0;
            bad = !colon || (size_t)(colon - val) >= sizeof p->udp_host;
            if (!bad) {
                *colon = 0;
                bad = parse_u64(colon + 1, &port) || port == 0 || port > 65535;
                snprintf(p->udp_host, sizeof p->udp_host, "%s", val);
                p->udp_port = (uint16_t)port;
            }
        } else if (!strcmp(key, "udp_rate")) bad = parse_u64(val, &p->udp_bytes_per_s);
        else if (!strcmp(key, "udp_size"))
            bad = parse_u64(val, &p->udp_size) || p->udp_size < 32 || p->udp_size > 65507;
        else if (!strcmp(key, "report")) bad = parse_u64(val, &p->report_s);
        else if (!strcmp(key, "ip")) snprintf(p->ip, sizeof p->ip, "%s", val);
        else if (!strcmp(key, "pattern")) {
            if (!strcmp(val, "seq")) p->pattern = 0;
            else if (!strcmp(val, "rand")) p->pattern = 1;
            else if (!strcmp(val, "hot")) p->pattern = 2;
            else bad = 1;
        }
        if (bad) {
            say("secmig-guest: error bad kernel parameter secmig.%s=%s", key, val);
            return -1;
        }
    }
    return 0;
}

static void read_mac(char *out, size_t len) {
    snprintf(out, len, "none");
    int fd = open("/sys/class/net/eth0/address", O_RDONLY);
    if (fd < 0) return;
    char buf[64];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return;
    buf[n] = 0;
    buf[strcspn(buf, "\n")] = 0;
    snprintf(out, len, "%s", buf);
}

/* How many units are due at time t since the start, for a rate per second (128-bit: no overflow). */
static uint64_t due(uint64_t rate, uint64_t t_ns) {
    return (uint64_t)((unsigned __int128)rate * t_ns / 1000000000u);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t xorshift(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* The page after `cursor` for the pattern: the next one (seq), any (rand), mostly the hot eighth (hot). */
static uint64_t next_page(int pattern, uint64_t cursor, uint64_t ws_pages) {
    if (pattern == 0) return cursor + 1 == ws_pages ? 0 : cursor + 1;
    uint64_t x = xorshift();
    if (pattern == 2 && x % 10 != 0) {
        uint64_t hot = ws_pages / 8 ? ws_pages / 8 : 1;
        return (x >> 8) % hot;
    }
    return (x >> 8) % ws_pages;
}

int main(void) {
    struct params p = {.ws_mib = 64, .dirty_pages_per_s = 5000, .udp_size = 1024};
    if (parse_cmdline(&p)) return 1;

    size_t ws_bytes = (size_t)p.ws_mib << 20, ws_pages = ws_bytes / PAGE;
    uint8_t *ws = mmap(NULL, ws_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (ws == MAP_FAILED) {
        say("secmig-guest: error cannot map a %llu MiB working set: %s", (unsigned long long)p.ws_mib,
            strerror(errno));
        return 1;
    }
    for (size_t i = 0; i < ws_pages; i++) ws[i * PAGE] = 1; /* resident before the clock starts */

    int sock = -1;
    struct sockaddr_in dst = {.sin_family = AF_INET};
    uint8_t *dgram = NULL;
    if (p.udp_port && p.udp_bytes_per_s) {
        if (inet_pton(AF_INET, p.udp_host, &dst.sin_addr) != 1) {
            say("secmig-guest: error secmig.udp: %s is not an IPv4 address", p.udp_host);
            return 1;
        }
        dst.sin_port = htons(p.udp_port);
        sock = socket(AF_INET, SOCK_DGRAM, 0);
        dgram = calloc(1, p.udp_size);
        if (sock < 0 || !dgram) {
            say("secmig-guest: error cannot open a UDP socket: %s", strerror(errno));
            return 1;
        }
        memcpy(dgram, "SMGU", 4);
    }

    char mac[64], udp[96];
    read_mac(mac, sizeof mac);
    if (sock >= 0) snprintf(udp, sizeof udp, "%s:%u", p.udp_host, (unsigned)p.udp_port);
    else snprintf(udp, sizeof udp, "none");
    char dirty[24];
    if (p.dirty_max) snprintf(dirty, sizeof dirty, "max");
    else snprintf(dirty, sizeof dirty, "%llu", (unsigned long long)p.dirty_pages_per_s);
    say("secmig-guest: ready ip=%s mac=%s ws_mib=%llu dirty_pages_per_s=%s udp=%s udp_bytes_per_s=%llu "
        "udp_size=%llu",
        p.ip[0] ? p.ip : "none", mac, (unsigned long long)p.ws_mib, dirty, udp,
        (unsigned long long)(sock >= 0 ? p.udp_bytes_per_s : 0), (unsigned long long)p.udp_size);

    uint64_t start = now_ns(), next_report = p.report_s ? p.report_s * 1000000000ull : UINT64_MAX;
    uint64_t pages = 0, page_base = 0, cursor = 0; /* pages due are counted from page_base */
    uint64_t sent = 0, sent_base = 0, dgrams = 0, seq = 0, errors = 0, bytes = 0;
    for (;;) {
        uint64_t t = now_ns() - start;
        if (p.dirty_max) {
            for (int i = 0; i < 4096; i++, pages++) {
                ((volatile uint64_t *)(ws + cursor * PAGE))[pages & 511] = pages;
                cursor = next_page(p.pattern, cursor, ws_pages);
            }
        } else if (p.dirty_pages_per_s) {
            uint64_t target = page_base + due(p.dirty_pages_per_s, t);
            uint64_t cap = due(p.dirty_pages_per_s, BACKLOG_NS);
            if (target > pages + cap) page_base += target - pages - cap, target = pages + cap;
            for (; pages < target; pages++) {
                ((volatile uint64_t *)(ws + cursor * PAGE))[pages & 511] = pages;
                cursor = next_page(p.pattern, cursor, ws_pages);
            }
        }
        if (sock >= 0) {
            uint64_t target = sent_base + due(p.udp_bytes_per_s, t);
            uint64_t cap = due(p.udp_bytes_per_s, BACKLOG_NS);
            if (target > sent + cap) sent_base += target - sent - cap, target = sent + cap;
            while (sent < target) {
                uint64_t ts = now_ns();
                memcpy(dgram + 4, &seq, 8);
                memcpy(dgram + 12, &ts, 8);
                seq++;
                /* Counted as sent even when refused (no ARP answer yet, a full queue): the rate is
                 * the offered one, and errors are reported apart. */
                sent += p.udp_size;
                if (sendto(sock, dgram, p.udp_size, 0, (struct sockaddr *)&dst, sizeof dst) < 0) errors++;
                else dgrams++, bytes += p.udp_size;
            }
        }
        if (t >= next_report) {
            say("secmig-guest: t=%llu.%03llus pages=%llu udp_datagrams=%llu udp_bytes=%llu udp_errors=%llu",
                (unsigned long long)(t / 1000000000u), (unsigned long long)(t / 1000000u % 1000u),
                (unsigned long long)pages, (unsigned long long)dgrams, (unsigned long long)bytes,
                (unsigned long long)errors);
            next_report += p.report_s * 1000000000ull;
        }
        if (!p.dirty_max) {
            struct timespec tick = {0, TICK_NS};
            nanosleep(&tick, NULL);
        }
    }
}
