// Counts the CUDA kernels a process launches (LD_PRELOAD'ed by scripts/check_cuda, which compiles it
// on the GPU machine): ggml-cuda launches through the CUDA runtime's cudaLaunchKernel (the <<<>>>
// syntax) and cudaLaunchKernelExC (cudaLaunchKernelEx, with programmatic dependent launch), both
// resolved from libcudart.so, so that a preloaded definition sees every launch outside CUDA graph
// replays (run with GGML_CUDA_DISABLE_GRAPHS=1). At exit, the count is appended to the file named
// by $MEKI_CUDA_LAUNCHES. No CUDA headers: the arguments are passed through unchanged.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct { unsigned int x, y, z; } dim3_t;
typedef int (*launch_fn)(const void *, dim3_t, dim3_t, void **, size_t, void *);
typedef int (*launch_ex_fn)(const void *, const void *, void **);

static unsigned long launches;

int cudaLaunchKernel(const void * func, dim3_t grid, dim3_t block, void ** args, size_t shmem, void * stream) {
    static launch_fn real;
    if (!real) {
        real = (launch_fn) dlsym(RTLD_NEXT, "cudaLaunchKernel");
    }
    __atomic_add_fetch(&launches, 1, __ATOMIC_RELAXED);
    return real(func, grid, block, args, shmem, stream);
}

int cudaLaunchKernelExC(const void * config, const void * func, void ** args) {
    static launch_ex_fn real;
    if (!real) {
        real = (launch_ex_fn) dlsym(RTLD_NEXT, "cudaLaunchKernelExC");
    }
    __atomic_add_fetch(&launches, 1, __ATOMIC_RELAXED);
    return real(config, func, args);
}

__attribute__((destructor)) static void report(void) {
    const char * path = getenv("MEKI_CUDA_LAUNCHES");
    FILE * f = path ? fopen(path, "a") : NULL;
    if (f) {
        fprintf(f, "%lu\n", launches);
        fclose(f);
    }
}
