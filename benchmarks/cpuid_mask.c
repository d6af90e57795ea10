/* Preloaded by benchmarks/avx2_only.py: every CPUID this process and its children execute after start-up answers with
 * the feature bits named in $CPUID_MASK cleared, so libraries that choose kernels by CPUID (torch's cpuinfo,
 * fbgemm, oneDNN, MKL, ONNX Runtime's MLAS) choose the kernels of a CPU without those features.
 *
 * How: arch_prctl(ARCH_SET_CPUID, 0) makes CPUID fault in this thread and the threads it starts (Linux's CPUID
 * faulting, the "cpuid_fault" flag); the SIGSEGV handler below executes the CPUID itself with faulting lifted for
 * that one instruction, clears the masked bits in the answer, and steps past the instruction. Faults that are not
 * a CPUID go to the handler the program installed (sigaction and signal are interposed for SIGSEGV to keep ours
 * first), or kill the process as they would have.
 *
 * $CPUID_MASK: "subleaf.reg=hexbits" entries for leaf 7 (where AVX-512, VNNI, BF16 and AMX are listed), separated
 * by ';', reg one of a b c d: "0.b=10000" clears AVX512F (leaf 7, subleaf 0, EBX bit 16).
 * $CPUID_MASK_COUNT=1 prints, at exit, how many CPUIDs were answered (so a reader can tell that none were in a
 * timed loop).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012
#define MAX_MASKS 32

struct mask { uint32_t subleaf; int reg; uint32_t bits; };
static struct mask masks[MAX_MASKS];
static int n_masks;
static struct sigaction program_segv;   /* what the program asked for, SIG_DFL until it asks */
static volatile long answered;
typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction;

static void cpuid_unmasked(uint32_t leaf, uint32_t subleaf, uint32_t r[4]) {
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(subleaf));
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *g = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (info->si_code == SI_KERNEL && ip[0] == 0x0F && ip[1] == 0xA2) {   /* a faulting CPUID is a #GP */
        uint32_t leaf = (uint32_t)g[REG_RAX], subleaf = (uint32_t)g[REG_RCX], r[4];
        cpuid_unmasked(leaf, subleaf, r);
        for (int i = 0; i < n_masks; i++)
            if (leaf == 7 && masks[i].subleaf == subleaf)
                r[masks[i].reg] &= ~masks[i].bits;
        g[REG_RAX] = r[0]; g[REG_RBX] = r[1]; g[REG_RCX] = r[2]; g[REG_RDX] = r[3];
        g[REG_RIP] += 2;
        answered++;
        return;
    }
    struct sigaction program = program_segv;
    if (program.sa_flags & SA_RESETHAND) {       /* a one-shot handler: the next fault takes the default action */
        memset(&program_segv, 0, sizeof program_segv);
        program_segv.sa_handler = SIG_DFL;
    }
    if (program.sa_flags & SA_SIGINFO) {
        program.sa_sigaction(sig, info, context);
    } else if (program.sa_handler != SIG_DFL && program.sa_handler != SIG_IGN) {
        program.sa_handler(sig);
    } else {            /* back to the default action; returning re-executes the fault, which now kills */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL);
    }
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !n_masks) return real_sigaction(sig, act, old);
    if (old) *old = program_segv;
    if (act) program_segv = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {   /* gcc's cc1plus sets its SIGSEGV handler this way */
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    sigemptyset(&act.sa_mask);
    return sigaction(sig, &act, &old) ? SIG_ERR : old.sa_handler;
}

static void report(void) { fprintf(stderr, "cpuid_mask: %ld CPUID answered in process %d\n", answered, getpid()); }

__attribute__((constructor)) static void start(void) {
    real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    const char *spec = getenv("CPUID_MASK");
    if (!spec || !*spec) return;
    char *copy = strdup(spec), *save = NULL;
    for (char *item = strtok_r(copy, ";", &save); item && n_masks < MAX_MASKS; item = strtok_r(NULL, ";", &save)) {
        unsigned subleaf, bits;
        char reg;
        if (sscanf(item, "%x.%c=%x", &subleaf, &reg, &bits) != 3 || reg < 'a' || reg > 'd') {
            fprintf(stderr, "cpuid_mask: cannot read %s in CPUID_MASK\n", item);
            _exit(2);
        }
        masks[n_masks++] = (struct mask){subleaf, reg - 'a', bits};
    }
    free(copy);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;  /* on the program's alternate stack, where it set one */
    sigemptyset(&sa.sa_mask);
    if (real_sigaction(SIGSEGV, &sa, NULL) || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0)) {
        fprintf(stderr, "cpuid_mask: this kernel or CPU cannot fault on CPUID (no cpuid_fault); nothing masked\n");
        _exit(2);
    }
    const char *count = getenv("CPUID_MASK_COUNT");
    if (count && *count == '1') atexit(report);
}
