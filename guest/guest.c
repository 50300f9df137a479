/* secmig reference guest: a tiny multiboot kernel that dirties guest memory at a known pace.
 *
 * It reads its parameters from the kernel command line (QEMU's -append):
 *
 *     ws=64M         working set, bytes (K, M, G suffixes are binary; an optional "iB"/"B" is accepted)
 *     rate=20000     page writes per second; 0 writes as fast as the vCPU can
 *     pattern=seq    seq (cyclic sweep), rand (uniform over the working set) or hot (hotspot)
 *     hotshare=90    hot pattern: percent of the writes that land in the working set (the hot set);
 *                    the others fall uniformly on all the RAM above it (the cold set)
 *     seed=1         seed of the random patterns
 *
 * Every write dirties one 4 KiB page of the working set with a non-zero word (so QEMU cannot send it
 * as a zero page). A status block at the fixed guest-physical address GUEST_STATUS_ADDR holds a 64-bit
 * count of those writes; the harness reads it over QMP to measure the real write rate. Pacing uses the
 * TSC, calibrated against the PIT at boot; when the vCPU falls more than 100 ms behind (it was paused,
 * throttled or descheduled) the backlog is dropped rather than written in a burst.
 *
 * It must stay freestanding: no libc, no libgcc (the 64-bit divisions it needs are below).
 */
#include <stddef.h>
#include <stdint.h>

#define GUEST_STATUS_ADDR 0x101000u
#define GUEST_MAGIC 0x314747494D434553ull /* "SECMIGG1" */
#define GUEST_VERSION 1u
#define WS_BASE (4u << 20) /* the working set starts at 4 MiB, well past this kernel */
#define PAGE_SHIFT 12
#define PIT_HZ 1193182u
#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002u

enum guest_state { STATE_BOOTING = 0, STATE_FILLING = 1, STATE_RUNNING = 2, STATE_ERROR = 3 };
enum guest_pattern { PATTERN_SEQ = 0, PATTERN_RAND = 1, PATTERN_HOT = 2 };
enum guest_error { ERR_NONE = 0, ERR_MAGIC = 1, ERR_NO_MEMINFO = 2, ERR_WS_TOO_BIG = 3, ERR_BAD_ARG = 4 };

/* Every field is 64 bits so the harness reads the block with one `xp /Ngx`. Keep in step with
 * secmig.agent.qemu.guest.GuestStatus. */
struct guest_status {
    uint64_t magic;
    uint64_t writes;     /* page writes since the working set was filled */
    uint64_t passes;     /* completed sweeps (seq pattern) */
    uint64_t ws_pages;
    uint64_t rate;       /* target page writes/s, 0 = unlimited */
    uint64_t pattern;
    uint64_t tsc_hz;
    uint64_t state;
    uint64_t mem_bytes;  /* RAM the guest saw (multiboot mem_upper + 1 MiB) */
    uint64_t ws_base;
    uint64_t cold_pages; /* hot pattern: pages above the working set that take the other writes */
    uint64_t hot_share;  /* percent */
    uint64_t version;
    uint64_t lagged;     /* times the pacing fell 100 ms behind and dropped its backlog */
    uint64_t error;
};

__attribute__((section(".status"), used)) volatile struct guest_status guest_status;

struct multiboot_info {
    uint32_t flags;
    uint32_t mem_lower;
    uint32_t mem_upper;
    uint32_t boot_device;
    uint32_t cmdline;
};

/* ---- 64-bit division for a freestanding 32-bit build (gcc calls these for uint64_t / and %) ---- */

static uint64_t udivmod64(uint64_t n, uint64_t d, uint64_t *rem)
{
    uint64_t q = 0, r = 0;
    if (d == 0) {
        if (rem)
            *rem = 0;
        return ~0ull;
    }
    for (int i = 63; i >= 0; i--) {
        r = (r << 1) | ((n >> i) & 1);
        if (r >= d) {
            r -= d;
            q |= 1ull << i;
        }
    }
    if (rem)
        *rem = r;
    return q;
}

uint64_t __udivdi3(uint64_t n, uint64_t d);
uint64_t __umoddi3(uint64_t n, uint64_t d);
uint64_t __udivdi3(uint64_t n, uint64_t d) { return udivmod64(n, d, NULL); }
uint64_t __umoddi3(uint64_t n, uint64_t d)
{
    uint64_t r;
    udivmod64(n, d, &r);
    return r;
}

/* ---- port I/O, TSC, serial ---- */

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause"); }

#define COM1 0x3F8
static void serial_init(void)
{
    outb(COM1 + 1, 0x00); /* no interrupts */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x01); /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0xC7); /* FIFO */
}
static void serial_putc(char c)
{
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
        ;
    outb(COM1, (uint8_t)c);
}
static void puts_(const char *s)
{
    while (*s)
        serial_putc(*s++);
}
static void putu(uint64_t v)
{
    char buf[24];
    int i = 0;
    do {
        buf[i++] = (char)('0' + (int)(v % 10));
        v /= 10;
    } while (v && i < 23);
    while (i)
        serial_putc(buf[--i]);
}
static void put_kv(const char *k, uint64_t v)
{
    puts_(k);
    putu(v);
    puts_("\n");
}

/* ---- TSC frequency from the PIT: channel 2 in mode 0 counts down 50 ms with its gate held high ---- */

static uint64_t calibrate_tsc_hz(void)
{
    const uint32_t latch = PIT_HZ / 20;
    uint8_t p61 = inb(0x61);
    outb(0x61, (uint8_t)((p61 & ~0x02) | 0x01)); /* gate on, speaker off */
    outb(0x43, 0xB0);                            /* channel 2, lobyte/hibyte, mode 0, binary */
    outb(0x42, (uint8_t)(latch & 0xff));
    outb(0x42, (uint8_t)(latch >> 8));
    uint64_t t0 = rdtsc();
    uint32_t spins = 0;
    while (!(inb(0x61) & 0x20) && spins < 100000000u)
        spins++;
    uint64_t t1 = rdtsc();
    outb(0x61, p61);
    return (t1 - t0) * 20;
}

/* ---- command line ---- */

static int starts_with(const char *s, const char *prefix)
{
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    return 1;
}

/* Parses a decimal number with an optional K/M/G (binary) suffix and an optional "iB"/"B"; returns
 * the end of the token, or NULL if it is not a number. */
static const char *parse_num(const char *s, uint64_t *out, int allow_suffix)
{
    uint64_t v = 0;
    const char *start = s;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (uint64_t)(*s++ - '0');
    if (s == start)
        return NULL;
    if (allow_suffix) {
        int shift = 0;
        if (*s == 'K' || *s == 'k')
            shift = 10;
        else if (*s == 'M' || *s == 'm')
            shift = 20;
        else if (*s == 'G' || *s == 'g')
            shift = 30;
        if (shift) {
            s++;
            v <<= shift;
            if (*s == 'i')
                s++;
            if (*s == 'B')
                s++;
        }
    }
    if (*s != '\0' && *s != ' ')
        return NULL;
    *out = v;
    return s;
}

struct params {
    uint64_t ws_bytes, rate, pattern, hot_share, seed;
    int bad;
};

static void parse_cmdline(const char *s, struct params *p)
{
    while (s && *s) {
        while (*s == ' ')
            s++;
        if (!*s)
            break;
        const char *end = NULL;
        if (starts_with(s, "ws="))
            end = parse_num(s + 3, &p->ws_bytes, 1);
        else if (starts_with(s, "rate="))
            end = parse_num(s + 5, &p->rate, 0);
        else if (starts_with(s, "hotshare="))
            end = parse_num(s + 9, &p->hot_share, 0);
        else if (starts_with(s, "seed="))
            end = parse_num(s + 5, &p->seed, 0);
        else if (starts_with(s, "pattern=seq") && (s[11] == ' ' || !s[11])) {
            p->pattern = PATTERN_SEQ;
            end = s + 11;
        } else if (starts_with(s, "pattern=rand") && (s[12] == ' ' || !s[12])) {
            p->pattern = PATTERN_RAND;
            end = s + 12;
        } else if (starts_with(s, "pattern=hot") && (s[11] == ' ' || !s[11])) {
            p->pattern = PATTERN_HOT;
            end = s + 11;
        } else if (starts_with(s, "ws=") || starts_with(s, "rate=") || starts_with(s, "pattern=")) {
            end = NULL;
        } else {
            /* not ours (QEMU puts the kernel's file name first): skip the token */
            while (*s && *s != ' ')
                s++;
            continue;
        }
        if (!end) {
            p->bad = 1;
            while (*s && *s != ' ')
                s++;
            continue;
        }
        s = end;
    }
}

/* ---- the workload ---- */

static uint32_t rng_state;
static inline uint32_t xorshift32(void)
{
    uint32_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    rng_state = x;
    return x;
}

static uint32_t ws_pages, cold_pages, hot_share, pattern, seq_next;

static inline void touch(uint32_t page, uint32_t stamp)
{
    volatile uint32_t *p = (volatile uint32_t *)(uintptr_t)(WS_BASE + (page << PAGE_SHIFT) + ((stamp & 1023u) << 2));
    *p = stamp | 1u;
}

static inline uint32_t next_page(void)
{
    uint32_t page;
    switch (pattern) {
    case PATTERN_SEQ:
        page = seq_next++;
        if (seq_next == ws_pages) {
            seq_next = 0;
            guest_status.passes++;
        }
        return page;
    case PATTERN_RAND:
        return xorshift32() % ws_pages;
    default:
        if (cold_pages == 0 || xorshift32() % 100u < hot_share)
            return xorshift32() % ws_pages;
        return ws_pages + xorshift32() % cold_pages;
    }
}

static void fail(uint64_t code, const char *why)
{
    guest_status.error = code;
    guest_status.state = STATE_ERROR;
    puts_("secmig-guest: error: ");
    puts_(why);
    puts_("\n");
    for (;;)
        __asm__ volatile("cli; hlt");
}

void kmain(uint32_t magic, const struct multiboot_info *mbi);
void kmain(uint32_t magic, const struct multiboot_info *mbi)
{
    guest_status.state = STATE_BOOTING;
    guest_status.version = GUEST_VERSION;
    guest_status.magic = GUEST_MAGIC;
    serial_init();
    puts_("secmig-guest: booting\n");
    if (magic != MULTIBOOT_BOOTLOADER_MAGIC)
        fail(ERR_MAGIC, "not started by a multiboot loader");
    if (!(mbi->flags & 1u))
        fail(ERR_NO_MEMINFO, "no memory information");
    uint64_t mem_bytes = ((uint64_t)mbi->mem_upper << 10) + (1u << 20);
    guest_status.mem_bytes = mem_bytes;

    struct params p = {.ws_bytes = 64u << 20, .rate = 0, .pattern = PATTERN_SEQ, .hot_share = 90, .seed = 1, .bad = 0};
    if (mbi->flags & (1u << 2))
        parse_cmdline((const char *)(uintptr_t)mbi->cmdline, &p);
    if (p.bad || p.hot_share > 100)
        fail(ERR_BAD_ARG, "bad command line");
    if (p.ws_bytes + WS_BASE > mem_bytes || p.ws_bytes < 4096)
        fail(ERR_WS_TOO_BIG, "working set does not fit in RAM");

    ws_pages = (uint32_t)(p.ws_bytes >> PAGE_SHIFT);
    pattern = (uint32_t)p.pattern;
    cold_pages = p.pattern == PATTERN_HOT ? (uint32_t)((mem_bytes - WS_BASE - p.ws_bytes) >> PAGE_SHIFT) : 0;
    hot_share = (uint32_t)p.hot_share;
    rng_state = (uint32_t)p.seed ? (uint32_t)p.seed : 1u;

    guest_status.ws_pages = ws_pages;
    guest_status.ws_base = WS_BASE;
    guest_status.rate = p.rate;
    guest_status.pattern = pattern;
    guest_status.cold_pages = cold_pages;
    guest_status.hot_share = hot_share;

    uint64_t hz = calibrate_tsc_hz();
    guest_status.tsc_hz = hz;
    put_kv("secmig-guest: tsc_hz=", hz);
    put_kv("secmig-guest: mem_bytes=", mem_bytes);
    put_kv("secmig-guest: ws_pages=", ws_pages);
    put_kv("secmig-guest: rate=", p.rate);
    put_kv("secmig-guest: pattern=", pattern);

    /* Make every page of the working set non-zero once, so all of it is sent in full from the start. */
    guest_status.state = STATE_FILLING;
    for (uint32_t i = 0; i < ws_pages; i++)
        touch(i, i);
    guest_status.state = STATE_RUNNING;
    puts_("secmig-guest: running\n");

    uint32_t stamp = 1;
    if (p.rate == 0) {
        for (;;) {
            touch(next_page(), stamp++);
            guest_status.writes++;
        }
    }
    uint64_t interval = hz / p.rate;
    if (interval == 0)
        interval = 1;
    const uint64_t max_lag = hz / 10;
    uint64_t due = rdtsc();
    for (;;) {
        uint64_t now = rdtsc();
        if ((int64_t)(now - due) < 0) {
            cpu_relax();
            continue;
        }
        if (now - due > max_lag) {
            due = now;
            guest_status.lagged++;
        }
        touch(next_page(), stamp++);
        guest_status.writes++;
        due += interval;
    }
}
