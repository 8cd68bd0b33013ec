/* upper_case: a BOINCified program in the shape of BOINC's upper_case sample.
 *
 * It copies its input "in" to its output "out" in upper case, a block at a time, reports
 * fraction done and operations, checkpoints when boinc_time_to_checkpoint() says so (the
 * offset in "upper_case_state"), and resumes from that checkpoint when it is restarted.
 *
 *   upper_case [STEP_SECONDS [BLOCK_BYTES [FINISH_STATUS [trickle]]]]
 *
 * Each block takes STEP_SECONDS of wall time (default 0.2), so a test job lasts as long
 * on a slow host as on a fast one. FINISH_STATUS (default 0) is passed to boinc_finish;
 * "trickle" sends a trickle-up message when the work is done.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "boinc_api.h"

#define CHECKPOINT_FILE "upper_case_state"
#define INPUT_FILENAME "in"
#define OUTPUT_FILENAME "out"
#define FPOPS_PER_BYTE 1e6

static void pause_seconds(double s) {
    struct timespec ts;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    nanosleep(&ts, NULL);
}

static int do_checkpoint(FILE* out, long nchars) {
    char path[512];
    FILE* f = boinc_fopen("upper_case_state.tmp", "w");
    if (!f) return 1;
    fprintf(f, "%ld\n", nchars);
    if (fflush(f) != 0 || fsync(fileno(f)) != 0 || fclose(f) != 0) return 1;
    if (fflush(out) != 0 || fsync(fileno(out)) != 0) return 1;
    boinc_resolve_filename(CHECKPOINT_FILE, path, sizeof(path));
    return rename("upper_case_state.tmp", path) != 0;
}

int main(int argc, char** argv) {
    double step = argc > 1 ? atof(argv[1]) : 0.2;
    long block = argc > 2 ? atol(argv[2]) : 64;
    int finish_status = argc > 3 ? atoi(argv[3]) : 0;
    int trickle = argc > 4 && strcmp(argv[4], "trickle") == 0;
    char input_path[512], output_path[512], chkpt_path[512];
    long nchars = 0, size, i;
    struct stat st;
    FILE *infile, *out, *state;
    int c, retval;

    retval = boinc_init();
    if (retval) {
        fprintf(stderr, "boinc_init returned %d\n", retval);
        exit(retval);
    }
    if (block < 1) block = 1;

    boinc_resolve_filename(INPUT_FILENAME, input_path, sizeof(input_path));
    infile = boinc_fopen(input_path, "rb");
    if (!infile) {
        fprintf(stderr, "Couldn't find input file, resolved name %s.\n", input_path);
        exit(-1);
    }
    size = stat(input_path, &st) == 0 ? (long)st.st_size : 0;
    boinc_resolve_filename(OUTPUT_FILENAME, output_path, sizeof(output_path));

    boinc_resolve_filename(CHECKPOINT_FILE, chkpt_path, sizeof(chkpt_path));
    state = boinc_fopen(chkpt_path, "r");
    if (state) {
        if (fscanf(state, "%ld", &nchars) != 1 || nchars < 0 || nchars > size) nchars = 0;
        fclose(state);
    }
    if (nchars > 0) {
        fseek(infile, nchars, SEEK_SET);
        if (truncate(output_path, nchars) != 0) nchars = 0;
        fprintf(stderr, "upper_case: resuming at byte %ld\n", nchars);
        out = boinc_fopen(output_path, nchars ? "ab" : "wb");
    } else {
        fprintf(stderr, "upper_case: starting at byte 0\n");
        out = boinc_fopen(output_path, "wb");
    }
    if (!out) {
        perror("upper_case: output open failed");
        exit(1);
    }

    for (;;) {
        for (i = 0; i < block; i++) {
            c = fgetc(infile);
            if (c == EOF) break;
            fputc(toupper(c), out);
            nchars++;
        }
        if (c == EOF && i == 0) break;
        pause_seconds(step);
        if (boinc_time_to_checkpoint()) {
            retval = do_checkpoint(out, nchars);
            if (retval) {
                fprintf(stderr, "upper_case: checkpoint failed %d\n", retval);
                exit(retval);
            }
            boinc_checkpoint_completed();
        }
        boinc_ops_cumulative(nchars * FPOPS_PER_BYTE, 0);
        if (size > 0) boinc_fraction_done((double)nchars / (double)size);
        if (c == EOF) break;
    }
    if (fclose(out) != 0) {
        fprintf(stderr, "upper_case: flush failed\n");
        exit(1);
    }
    if (trickle) boinc_send_trickle_up((char*)"upper_case", (char*)"<chars>done</chars>");
    boinc_fraction_done(1);
    boinc_finish(finish_status);
    return 0;
}
