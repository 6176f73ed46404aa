// libFuzzer target: a MeKi GGUF file, whatever its bytes, through the load path and one decode.
//
// Mirrors llama.cpp's OSS-Fuzz targets (fuzz_load_model, fuzz_inference) for what we added: the
// bytes become a file (a memfd: the loader takes a path), which is loaded as the Python binding
// and the tools load it (mmap, the MeKi table lazy); when it loads, a small context decodes two
// tokens, so the MeKi graph (its gather from the table and the branch) runs on what the file holds.
//
// What counts as a failure: any sanitizer report, a crash, an abort (a GGML_ASSERT reached from a
// value in the file: it must be a load error instead), a leak, a timeout (-timeout) and memory
// beyond -rss_limit_mb. A refusal by the loader is the expected outcome for most inputs.
//
// Built by `scripts/build_llama.py --sanitize` (build/asan/bin/fuzz-load), run by
// scripts/check_reliability; seeds in tests/fuzz/corpus (tests/fuzz/make_corpus.py).
#include "llama.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>

static void quiet(ggml_log_level, const char *, void *) {}

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    const int fd = memfd_create("fuzz.gguf", 0);
    if (fd < 0) {
        return 0;
    }
    for (size_t done = 0; done < size;) {
        const ssize_t n = write(fd, data + done, size - done);
        if (n <= 0) {
            close(fd);
            return 0;
        }
        done += (size_t) n;
    }
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(path, mp);
    if (model != nullptr) {
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = 16;
        cp.n_batch = 16;
        cp.n_ubatch = 16;
        cp.n_seq_max = 1;
        cp.n_threads = 1;
        cp.n_threads_batch = 1;
        llama_context * ctx = llama_init_from_model(model, cp);
        if (ctx != nullptr) {
            const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
            llama_token tokens[2] = {0, n_vocab > 1 ? n_vocab - 1 : 0};
            llama_decode(ctx, llama_batch_get_one(tokens, n_vocab > 0 ? 2 : 0));
            llama_free(ctx);
        }
        llama_model_free(model);
    }
    close(fd);
    return 0;
}
