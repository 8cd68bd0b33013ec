/* boinc_api.c: boincvm's guest-side BOINC API (see boinc_api.h).
 *
 * Every call is plain file I/O in the API directory ($BOINCVM_API_DIR):
 *   resolve             the wrapper's map of logical names to guest paths (LOGICAL\tPATH)
 *   status              key=value lines: fraction_done, operations, uses_checkpoints,
 *                       want_network
 *   critical            present while the program is inside a critical section
 *   checkpoint_request  the wrapper's "checkpoint now" (a sequence number)
 *   checkpoint_ready    the program's "my checkpoint is written" (the same number)
 *   temporary_exit      delay, notice flag, reason
 *   finish              exit status, message
 *   trickle_up/NNNNNNNN.msg    variety on the first line, then the text
 *   trickle_down/NAME          the wrapper's trickle-down messages
 *   network_suspended   the wrapper's: present while the client keeps the network off
 * Files are written as NAME.tmp and renamed, so a reader never sees half of one.
 */
#define _POSIX_C_SOURCE 200809L
#include "boinc_api.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define PATH_BYTES 4096
/* The status file is rewritten at most this often while values change. */
#define STATUS_INTERVAL 0.5
/* A checkpoint request is looked up at most this often. */
#define REQUEST_INTERVAL 0.1
/* boinc_checkpoint_completed() waits at most this long for the wrapper's snapshot. */
#define SNAPSHOT_WAIT 3600.0

#define HAS_FRACTION 1
#define HAS_OPS 2
#define HAS_FPOPS 4
#define HAS_OPS_RATE 8
#define HAS_FPOPS_RATE 16

static int initialized;
static int standalone = 1;
static char api_dir[PATH_BYTES];
static double start_time;

static double fraction_done;
static double ops_cumulative, fpops_cumulative, ops_per_cpu_sec, fpops_per_cpu_sec;
static int have;
static int uses_checkpoints;
static int want_network;
static int status_dirty;
static double last_status_write = -1e30;

static int critical_depth;
static double last_request_check = -1e30;
static int request_cached;
static unsigned long trickle_seq;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void pause_seconds(double seconds) {
    struct timespec ts;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static int api_path(char* out, size_t size, const char* name) {
    int n = snprintf(out, size, "%s/%s", api_dir, name);
    return n < 0 || (size_t)n >= size ? -1 : 0;
}

static void setup(void) {
    const char* dir;
    struct stat st;
    if (initialized) return;
    initialized = 1;
    start_time = now();
    dir = getenv("BOINCVM_API_DIR");
    if (dir == NULL || dir[0] == '\0' || strlen(dir) >= sizeof(api_dir) - 64) return;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) return;
    strcpy(api_dir, dir);
    standalone = 0;
}

/* Writes NAME in the API directory through NAME.tmp and a rename. */
static int write_api_file(const char* name, const char* data, size_t len) {
    char path[PATH_BYTES], tmp[PATH_BYTES];
    int fd;
    size_t done = 0;
    if (api_path(path, sizeof(path), name) != 0) return -1;
    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp)) return -1;
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return -1;
    while (done < len) {
        ssize_t w = write(fd, data + done, len - done);
        if (w < 0) {
            if (errno == EINTR) continue;
            close(fd);
            unlink(tmp);
            return -1;
        }
        done += (size_t)w;
    }
    if (close(fd) != 0 || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* Reads at most SIZE-1 bytes of PATH into BUF; returns the count or -1. */
static ssize_t read_file(const char* path, char* buf, size_t size) {
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    size_t got = 0;
    struct stat st;
    if (fd < 0) return -1;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return -1;
    }
    while (got + 1 < size) {
        ssize_t r = read(fd, buf + got, size - 1 - got);
        if (r < 0) {
            if (errno == EINTR) continue;
            close(fd);
            return -1;
        }
        if (r == 0) break;
        got += (size_t)r;
    }
    close(fd);
    buf[got] = '\0';
    return (ssize_t)got;
}

static int api_exists(const char* name) {
    char path[PATH_BYTES];
    struct stat st;
    return api_path(path, sizeof(path), name) == 0 && stat(path, &st) == 0;
}

static void write_status(int force) {
    char buf[1024];
    int n = 0;
    double t;
    if (standalone) return;
    if (!status_dirty && !force) return;
    t = now();
    if (!force && t - last_status_write < STATUS_INTERVAL) return;
    if (have & HAS_FRACTION) n += snprintf(buf + n, sizeof(buf) - (size_t)n, "fraction_done=%.9g\n", fraction_done);
    if (have & HAS_OPS) n += snprintf(buf + n, sizeof(buf) - (size_t)n, "ops_cumulative=%.17g\n", ops_cumulative);
    if (have & HAS_FPOPS) n += snprintf(buf + n, sizeof(buf) - (size_t)n, "fpops_cumulative=%.17g\n", fpops_cumulative);
    if (have & HAS_OPS_RATE) n += snprintf(buf + n, sizeof(buf) - (size_t)n, "ops_per_cpu_sec=%.17g\n", ops_per_cpu_sec);
    if (have & HAS_FPOPS_RATE) n += snprintf(buf + n, sizeof(buf) - (size_t)n, "fpops_per_cpu_sec=%.17g\n", fpops_per_cpu_sec);
    if (uses_checkpoints) n += snprintf(buf + n, sizeof(buf) - (size_t)n, "uses_checkpoints=1\n");
    if (want_network) n += snprintf(buf + n, sizeof(buf) - (size_t)n, "want_network=1\n");
    if (write_api_file("status", buf, (size_t)n) == 0) {
        status_dirty = 0;
        last_status_write = t;
    }
}

int boinc_init(void) {
    setup();
    return 0;
}

int boinc_init_options(BOINC_OPTIONS* options) {
    (void)options;
    setup();
    return 0;
}

int boinc_is_standalone(void) {
    setup();
    return standalone;
}

double boinc_elapsed_time(void) {
    setup();
    return now() - start_time;
}

int boinc_get_status(BOINC_STATUS* s) {
    setup();
    memset(s, 0, sizeof(*s));
    if (!standalone) s->network_suspended = api_exists("network_suspended");
    return 0;
}

/* BOINC's API since May 2026: the program says it is waiting for the network; the client
 * then tells the volunteer a task needs it. */
void boincvm_waiting_for_network(int waiting) {
    setup();
    if (want_network == (waiting != 0)) return;
    want_network = waiting != 0;
    write_status(1);
}

/* The names BOINC's API had before May 2026, kept for programs that still call them. */
int boinc_need_network(void) {
    boincvm_waiting_for_network(1);
    return 0;
}

int boinc_network_poll(void) {
    setup();
    if (standalone) return 0;
    return api_exists("network_suspended") ? 1 : 0;
}

void boinc_network_done(void) {
    boincvm_waiting_for_network(0);
}

void boinc_network_usage(double sent, double received) {
    (void)sent; /* BOINC's client ignored these figures; so does the wrapper */
    (void)received;
}

int boinc_set_min_checkpoint_period(int seconds) {
    (void)seconds; /* the client's checkpoint period rules, through the wrapper */
    return 0;
}

int boinc_resolve_filename(const char* virtual_name, char* physical_name, int len) {
    char path[PATH_BYTES];
    static char map[65536];
    const char* result = virtual_name;
    size_t want;
    setup();
    if (virtual_name == NULL || physical_name == NULL || len <= 0) return -1;
    if (!standalone && api_path(path, sizeof(path), "resolve") == 0 && read_file(path, map, sizeof(map)) > 0) {
        size_t name_len = strlen(virtual_name);
        char* line = map;
        while (line && *line) {
            char* end = strchr(line, '\n');
            if (end) *end = '\0';
            if (strncmp(line, virtual_name, name_len) == 0 && line[name_len] == '\t') {
                result = line + name_len + 1;
                break;
            }
            line = end ? end + 1 : NULL;
        }
    }
    want = strlen(result);
    if (want + 1 > (size_t)len) {
        memcpy(physical_name, result, (size_t)len - 1);
        physical_name[len - 1] = '\0';
        return -1;
    }
    memcpy(physical_name, result, want + 1);
    return 0;
}

int boinc_fraction_done(double x) {
    setup();
    if (!(x >= 0.0)) x = 0.0; /* also NaN */
    if (x > 1.0) x = 1.0;
    if (!(have & HAS_FRACTION) || x != fraction_done) status_dirty = 1;
    fraction_done = x;
    have |= HAS_FRACTION;
    write_status(0);
    return 0;
}

double boinc_get_fraction_done(void) {
    return fraction_done;
}

static void set_value(double* slot, double value, int flag) {
    if (!(value >= 0.0) || value > 1e300) return;
    if (!(have & flag) || *slot != value) status_dirty = 1;
    *slot = value;
    have |= flag;
}

void boinc_ops_cumulative(double fp, double integer) {
    setup();
    set_value(&fpops_cumulative, fp, HAS_FPOPS);
    set_value(&ops_cumulative, integer, HAS_OPS);
    write_status(0);
}

void boinc_ops_per_cpu_sec(double fp, double integer) {
    setup();
    set_value(&fpops_per_cpu_sec, fp, HAS_FPOPS_RATE);
    set_value(&ops_per_cpu_sec, integer, HAS_OPS_RATE);
    write_status(0);
}

void boinc_fpops_cumulative(double fp) {
    setup();
    set_value(&fpops_cumulative, fp, HAS_FPOPS);
    write_status(0);
}

void boinc_fpops_per_cpu_sec(double fp) {
    setup();
    set_value(&fpops_per_cpu_sec, fp, HAS_FPOPS_RATE);
    write_status(0);
}

void boinc_begin_critical_section(void) {
    setup();
    if (critical_depth++ == 0 && !standalone) write_api_file("critical", "1\n", 2);
}

void boinc_end_critical_section(void) {
    char path[PATH_BYTES];
    setup();
    if (critical_depth == 0) return;
    if (--critical_depth == 0 && !standalone && api_path(path, sizeof(path), "critical") == 0) unlink(path);
}

int boinc_time_to_checkpoint(void) {
    double t;
    setup();
    if (standalone) return 0;
    if (!uses_checkpoints) {
        uses_checkpoints = 1;
        write_status(1);
    }
    if (critical_depth > 0) return 0;
    t = now();
    if (t - last_request_check >= REQUEST_INTERVAL) {
        request_cached = api_exists("checkpoint_request");
        last_request_check = t;
    }
    if (!request_cached) return 0;
    /* As BOINC does: the program is in a critical section until it has checkpointed. */
    boinc_begin_critical_section();
    return 1;
}

int boinc_checkpoint_completed(void) {
    char path[PATH_BYTES], seq[64];
    ssize_t n;
    double deadline;
    setup();
    if (standalone) return 0;
    if (critical_depth > 0) boinc_end_critical_section();
    write_status(1);
    request_cached = 0;
    last_request_check = -1e30;
    if (critical_depth > 0) return 0; /* still inside the program's own critical section */
    if (api_path(path, sizeof(path), "checkpoint_request") != 0) return 0;
    n = read_file(path, seq, sizeof(seq));
    if (n < 0) return 0; /* no request: nothing to wait for */
    if (write_api_file("checkpoint_ready", seq, (size_t)n) != 0) return 0;
    deadline = now() + SNAPSHOT_WAIT;
    while (api_exists("checkpoint_request") && now() < deadline) pause_seconds(0.05);
    if (api_path(path, sizeof(path), "checkpoint_ready") == 0) unlink(path);
    return 0;
}

static void write_message_file(const char* name, long first, const char* second, const char* text) {
    char buf[2048];
    int n;
    if (standalone) return;
    n = snprintf(buf, sizeof(buf), "%ld\n%s%s%s", first, second ? second : "", second ? "\n" : "", text ? text : "");
    if (n < 0) return;
    if ((size_t)n >= sizeof(buf)) n = (int)sizeof(buf) - 1;
    if (n == 0 || buf[n - 1] != '\n') {
        if ((size_t)n + 1 < sizeof(buf)) buf[n++] = '\n';
    }
    write_api_file(name, buf, (size_t)n);
}

int boinc_finish(int status) {
    return boincvm_finish_message(status, NULL, 0);
}

int boincvm_finish_message(int status, const char* message, int is_notice) {
    (void)is_notice;
    setup();
    fflush(NULL);
    write_status(1);
    write_message_file("finish", status, NULL, message);
    exit(status);
}

int boincvm_temporary_exit(int delay, const char* reason, int is_notice) {
    setup();
    fflush(NULL);
    write_status(1);
    write_message_file("temporary_exit", delay, is_notice ? "1" : "0", reason);
    exit(0);
}

static int is_message_name(const char* name) {
    size_t len = strlen(name);
    if (name[0] == '.') return 0;
    return !(len > 4 && strcmp(name + len - 4, ".tmp") == 0);
}

int boinc_send_trickle_up(char* variety, char* text) {
    char dir[PATH_BYTES], name[64], body_name[96];
    DIR* d;
    struct dirent* e;
    char* body;
    size_t vlen, tlen;
    int retval;
    setup();
    if (standalone) return 0;
    if (variety == NULL || text == NULL || strchr(variety, '\n') != NULL) return -1;
    if (api_path(dir, sizeof(dir), "trickle_up") != 0) return -1;
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) return -1;
    d = opendir(dir);
    if (d == NULL) return -1;
    while ((e = readdir(d)) != NULL) {
        unsigned long seq = strtoul(e->d_name, NULL, 10);
        if (seq > trickle_seq) trickle_seq = seq;
    }
    closedir(d);
    trickle_seq++;
    snprintf(name, sizeof(name), "%08lu.msg", trickle_seq);
    snprintf(body_name, sizeof(body_name), "trickle_up/%s", name);
    vlen = strlen(variety);
    tlen = strlen(text);
    body = malloc(vlen + tlen + 2);
    if (body == NULL) return -1;
    memcpy(body, variety, vlen);
    body[vlen] = '\n';
    memcpy(body + vlen + 1, text, tlen);
    retval = write_api_file(body_name, body, vlen + 1 + tlen);
    free(body);
    return retval;
}

int boinc_receive_trickle_down(char* buf, int len) {
    char dir[PATH_BYTES], path[PATH_BYTES + 256], best[256];
    DIR* d;
    struct dirent* e;
    setup();
    if (standalone || buf == NULL || len <= 0) return 0;
    if (api_path(dir, sizeof(dir), "trickle_down") != 0) return 0;
    d = opendir(dir);
    if (d == NULL) return 0;
    best[0] = '\0';
    while ((e = readdir(d)) != NULL) {
        if (!is_message_name(e->d_name) || strlen(e->d_name) >= sizeof(best)) continue;
        if (best[0] == '\0' || strcmp(e->d_name, best) < 0) strcpy(best, e->d_name);
    }
    closedir(d);
    if (best[0] == '\0') return 0;
    snprintf(path, sizeof(path), "%s/%s", dir, best);
    if (read_file(path, buf, (size_t)len) < 0) return 0;
    unlink(path);
    return 1;
}
