/* Linked into the profiled build by scripts/order-text: records which
   functions ran and, when the process exits, writes their link-time
   addresses to $REGCACHE_TEXT_PROFILE/<pid>, one hex number per line.

   The build's SanitizerCoverage flags give every function a bool that its
   entry sets (inline-bool-flag) and a table of (function address, flags)
   pairs in the same order (pc-table); each module's constructor hands both
   to the two callbacks below. */
#define _GNU_SOURCE
#include <link.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define MAX_RANGES 8192

static bool *flags_start[MAX_RANGES], *flags_end[MAX_RANGES];
static int flag_ranges;
static const uintptr_t *pcs_start[MAX_RANGES], *pcs_end[MAX_RANGES];
static int pc_ranges;

/* How far the loader moved the binary (0 unless it is position-independent):
   an address minus this is its link-time address. The main program is the
   first object dl_iterate_phdr visits. */
static int main_program(struct dl_phdr_info *info, size_t size, void *bias) {
  (void)size;
  *(uintptr_t *)bias = info->dlpi_addr;
  return 1;
}

/* Modules may all pass the same whole-section range: each is kept once. */
void __sanitizer_cov_bool_flag_init(bool *start, bool *end) {
  for (int i = 0; i < flag_ranges; i++)
    if (flags_start[i] == start) return;
  if (flag_ranges < MAX_RANGES) {
    flags_start[flag_ranges] = start;
    flags_end[flag_ranges++] = end;
  }
}

void __sanitizer_cov_pcs_init(const uintptr_t *start, const uintptr_t *end) {
  for (int i = 0; i < pc_ranges; i++)
    if (pcs_start[i] == start) return;
  if (pc_ranges < MAX_RANGES) {
    pcs_start[pc_ranges] = start;
    pcs_end[pc_ranges++] = end;
  }
}

__attribute__((destructor)) static void write_profile(void) {
  const char *dir = getenv("REGCACHE_TEXT_PROFILE");
  if (!dir) return;
  char path[4096];
  snprintf(path, sizeof path, "%s/%d", dir, (int)getpid());
  FILE *f = fopen(path, "w");
  if (!f) return;
  uintptr_t bias = 0;
  dl_iterate_phdr(main_program, &bias);
  for (int m = 0; m < flag_ranges && m < pc_ranges; m++) {
    long n = flags_end[m] - flags_start[m];
    if ((pcs_end[m] - pcs_start[m]) / 2 != n) {
      fprintf(f, "# range %d: %ld flags but %ld functions\n", m, n, (long)(pcs_end[m] - pcs_start[m]) / 2);
      continue;
    }
    for (long i = 0; i < n; i++)
      if (flags_start[m][i])
        fprintf(f, "%lx\n", (unsigned long)(pcs_start[m][2 * i] - bias));
  }
  fclose(f);
}
