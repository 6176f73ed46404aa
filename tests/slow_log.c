/* LD_PRELOAD shim: llama.cpp's log worker made slow. Every fflush() called off the main thread
   (the logger's worker flushes after each line) first sleeps $SLOW_LOG_US microseconds (default
   2000), so that the worker is still behind when the tool's main() returns. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

int fflush(FILE * f) {
    static int (*real)(FILE *);
    if (!real) {
        real = (int (*)(FILE *)) dlsym(RTLD_NEXT, "fflush");
    }
    if (syscall(SYS_gettid) != getpid()) {
        const char * us = getenv("SLOW_LOG_US");
        usleep(us ? atoi(us) : 2000);
    }
    return real(f);
}
