/* check.h - the C tests' one assertion style: report the failed condition
 * with its place, count it, keep going; main() exits non-zero if any failed. */
#ifndef BATCHGATE_TEST_CHECK_H
#define BATCHGATE_TEST_CHECK_H

#include <stdio.h>
#include <string.h>

/* One counter per test program, shared by its files (a test and its fixture):
 * weak, so every file may include this header. */
__attribute__((weak)) int failures;

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);  \
            failures++;                                                               \
        }                                                                             \
    } while (0)

static inline void check_contains(const char *file, int line, const char *hay,
                                  const char *needle)
{
    if (!hay || !strstr(hay, needle)) {
        fprintf(stderr, "%s:%d: \"%s\" does not contain \"%s\"\n", file, line,
                hay ? hay : "(null)", needle);
        failures++;
    }
}
#define CHECK_CONTAINS(hay, needle) check_contains(__FILE__, __LINE__, (hay), (needle))

#endif /* BATCHGATE_TEST_CHECK_H */
