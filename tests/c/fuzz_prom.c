/* fuzz_prom.c - libFuzzer target: the Prometheus parser on arbitrary bytes.
 * The first byte picks a model filter; invariants of the result are checked. */
#include "bg_prom.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const models[] = {NULL, "", "m", "Qwen/Qwen2.5-0.5B", "x\"y"};
    const char *model = size ? models[data[0] % 5] : NULL;
    /* An exact-size heap copy: ASan catches any read past the end. */
    char *buf = malloc(size ? size : 1);
    if (!buf)
        return 0;
    if (size)
        memcpy(buf, data, size);
    bg_prom_sample s;
    unsigned f = bg_prom_parse(buf, size, model, &s);
    if (f != s.found)
        abort();
    if ((f & BG_PROM_KV_USAGE) && !(s.kv_usage >= 0 && s.kv_usage <= 1))
        abort();
    if (!(s.running >= 0 && s.waiting >= 0 && s.preemptions >= 0))
        abort();
    if ((f & BG_PROM_CACHE_CONFIG) && (s.num_gpu_blocks < 1 || s.block_size < 1))
        abort();
    if (!(f & BG_PROM_CACHE_CONFIG) && (s.num_gpu_blocks != -1 || s.block_size != -1))
        abort();
    if (s.lines + s.bad_lines > size)
        abort();
    free(buf);
    return 0;
}
