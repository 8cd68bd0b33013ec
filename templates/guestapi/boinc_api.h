/* boinc_api.h: boincvm's guest-side BOINC API.
 *
 * A BOINCified program built against this header and libboinc_api.a runs unchanged
 * inside a boincvm virtual machine: the calls keep BOINC's names and signatures, and
 * they talk to the boincvm wrapper on the host through files in the directory named
 * by the environment variable BOINCVM_API_DIR (the wrapper creates it and reads it
 * through the guest agent; no network). Without that variable the program runs
 * standalone, as a BOINC program does outside the client.
 *
 *   gcc -O2 prog.c -static -I DIR -L DIR -lboinc_api -o prog
 */
#ifndef BOINCVM_BOINC_API_H
#define BOINCVM_BOINC_API_H

#include <stdbool.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct BOINC_OPTIONS {
    int main_program;
    int check_heartbeat;
    int handle_process_control;
    int send_status_msgs;
    int direct_process_action;
    int multi_thread;
    int multi_process;
} BOINC_OPTIONS;

typedef struct BOINC_STATUS {
    int no_heartbeat;
    int suspended;
    int quit_request;
    int reread_init_data_file;
    int abort_request;
    double working_set_size;
    double max_working_set_size;
    int network_suspended;
} BOINC_STATUS;

extern int boinc_init(void);
extern int boinc_init_options(BOINC_OPTIONS*);
extern int boinc_finish(int status);
extern int boinc_resolve_filename(const char*, char*, int len);
extern int boinc_send_trickle_up(char* variety, char* text);
extern int boinc_set_min_checkpoint_period(int);
extern int boinc_checkpoint_completed(void);
extern int boinc_fraction_done(double);
extern double boinc_get_fraction_done(void);
extern int boinc_time_to_checkpoint(void);
extern void boinc_begin_critical_section(void);
extern void boinc_end_critical_section(void);
extern int boinc_is_standalone(void);
extern void boinc_ops_per_cpu_sec(double fp, double integer);
extern void boinc_ops_cumulative(double fp, double integer);
extern void boinc_fpops_per_cpu_sec(double fp);
extern void boinc_fpops_cumulative(double fp);
extern int boinc_receive_trickle_down(char* buf, int len);
extern int boinc_get_status(BOINC_STATUS*);
extern double boinc_elapsed_time(void);

/* Before May 2026 BOINC's API had these network calls; programs that still call them
 * keep working: need and done set what boinc_waiting_for_network() sets, poll answers 0
 * while the network is available, usage is ignored (as the client ignored it). */
extern int boinc_need_network(void);
extern int boinc_network_poll(void);
extern void boinc_network_done(void);
extern void boinc_network_usage(double sent, double received);

/* boinc_temporary_exit, boinc_finish_message and boinc_waiting_for_network are C++
 * functions in BOINC's API (the first two with default arguments); the library exports
 * them under these C names, and the inline functions below keep BOINC's names in C too. */
extern int boincvm_temporary_exit(int delay, const char* reason, int is_notice);
extern int boincvm_finish_message(int status, const char* message, int is_notice);
extern void boincvm_waiting_for_network(int waiting);

#ifdef __cplusplus
}  /* extern "C" */
#endif

static inline void boinc_options_defaults(BOINC_OPTIONS* b) {
    b->main_program = 1;
    b->check_heartbeat = 1;
    b->handle_process_control = 1;
    b->send_status_msgs = 1;
    b->direct_process_action = 1;
    b->multi_thread = 0;
    b->multi_process = 0;
}

static inline FILE* boinc_fopen(const char* path, const char* mode) {
    return fopen(path, mode);
}

#ifdef __cplusplus
#include <string>

inline int boinc_temporary_exit(int delay, const char* reason = 0, bool is_notice = false) {
    return boincvm_temporary_exit(delay, reason, is_notice ? 1 : 0);
}

inline int boinc_finish_message(int status, const char* message, bool is_notice) {
    return boincvm_finish_message(status, message, is_notice ? 1 : 0);
}

inline void boinc_waiting_for_network(bool waiting) {
    boincvm_waiting_for_network(waiting ? 1 : 0);
}

inline int boinc_resolve_filename_s(const char* virtual_name, std::string& physical_name) {
    char buf[4096];
    int retval = boinc_resolve_filename(virtual_name, buf, (int)sizeof(buf));
    physical_name = buf;
    return retval;
}
#else
static inline int boinc_temporary_exit(int delay, const char* reason, bool is_notice) {
    return boincvm_temporary_exit(delay, reason, is_notice ? 1 : 0);
}

static inline int boinc_finish_message(int status, const char* message, bool is_notice) {
    return boincvm_finish_message(status, message, is_notice ? 1 : 0);
}

static inline void boinc_waiting_for_network(bool waiting) {
    boincvm_waiting_for_network(waiting ? 1 : 0);
}
#endif

#endif /* BOINCVM_BOINC_API_H */
