/* glibc >= 2.34 defines PTHREAD_STACK_MIN as a sysconf() call, which the boost copy inside
   liblsl 1.13 tests with `#if`. Include the real header, then give the constant glibc < 2.34 had. */
#ifndef MIRAGE_PTHREAD_STACK_MIN_SHIM
#define MIRAGE_PTHREAD_STACK_MIN_SHIM
#include_next <bits/pthread_stack_min-dynamic.h>
#undef PTHREAD_STACK_MIN
#define PTHREAD_STACK_MIN 16384
#endif
