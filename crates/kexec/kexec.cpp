// kexec's scheduler: blocks one after another on the calling thread, a block's threads as
// fibers switched at barriers. See kexec.h.
//
// A switch on x86-64 is a few instructions of our own (callee-saved registers, MXCSR and the
// x87 control word on the stack, then the stack pointer); elsewhere, or with -DKEXEC_UCONTEXT,
// it is swapcontext, which also saves the signal mask with a system call each time (about half
// the executor's time on x86-64).
#include <atomic>
#include "kexec.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <map>
#include <string>
#include <vector>

#include "registry.h"

namespace kexec {

enum State { RUN, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };

#if defined(__x86_64__) && !defined(KEXEC_UCONTEXT)
#define KEXEC_ASM_SWITCH 1
// Save the callee-saved registers, MXCSR and the x87 control word on the current stack, store
// the stack pointer in *from, load `to` and restore the same from there.
extern "C" void kexec_switch(void** from, void* to);
asm(R"(
    .text
    .globl kexec_switch
    .type kexec_switch,@function
kexec_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size kexec_switch, .-kexec_switch
)");
struct Context {
    void* sp = nullptr;
};
#else
struct Context {
    ucontext_t uc;
};
#endif

struct Fiber {
    Context ctx;
    dim3 tid;
    unsigned linear;
    State state;
};

struct Block {
    dim3 bid, bdim, gdim;
    std::vector<Fiber> fibers;
    Context sched;
    Fiber* cur = nullptr;
    std::vector<uint64_t> scratch;  // [warps * 32]
    char* smem = nullptr;
    const std::function<void()>* body = nullptr;
};

thread_local Block* g_block = nullptr;

const dim3& thread_idx() { return g_block->cur->tid; }
const dim3& block_idx() { return g_block->bid; }
const dim3& block_dim() { return g_block->bdim; }
const dim3& grid_dim() { return g_block->gdim; }
unsigned lane_linear() { return g_block->cur->linear; }
uint64_t* warp_scratch() { return &g_block->scratch[(g_block->cur->linear / 32) * 32]; }
char* dyn_smem() { return g_block->smem; }

void fail(const char* what) {
    if (g_block && g_block->cur) {
        const dim3 &b = g_block->bid, &t = g_block->cur->tid;
        std::fprintf(stderr, "kexec: %s (block %u,%u,%u thread %u,%u,%u)\n", what, b.x, b.y, b.z, t.x,
                     t.y, t.z);
    } else {
        std::fprintf(stderr, "kexec: %s\n", what);
    }
    std::abort();
}

// switch from the context `from` (saved) to `to`
static void switch_to(Context* from, Context* to) {
#ifdef KEXEC_ASM_SWITCH
    kexec_switch(&from->sp, to->sp);
#else
    swapcontext(&from->uc, &to->uc);
#endif
}

static void wait_as(State s) {
    Block* b = g_block;
    Fiber* f = b->cur;
    f->state = s;
    switch_to(&f->ctx, &b->sched);
}

void syncthreads() { wait_as(AT_BLOCK_BARRIER); }
void warp_barrier() { wait_as(AT_WARP_BARRIER); }

static void fiber_main() {
    Block* b = g_block;
    (*b->body)();
    b->cur->state = DONE;
#ifdef KEXEC_ASM_SWITCH
    switch_to(&b->cur->ctx, &b->sched);
    __builtin_unreachable();
#endif
    // (ucontext) returning resumes uc_link: the scheduler
}

// stacks are kept between launches (one per thread slot)
static const size_t kStack = 256 * 1024;
thread_local std::vector<char*> g_stacks;

static char* stack_for(size_t i) {
    while (g_stacks.size() <= i) {
        void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED) fail("could not map a fiber stack");
        g_stacks.push_back(static_cast<char*>(p));
    }
    return g_stacks[i];
}

// A context that starts fiber_main on `stack` (kStack bytes).
static void init_fiber(Context& c, char* stack, Context& sched) {
#ifdef KEXEC_ASM_SWITCH
    (void)sched;
    // what kexec_switch pops: MXCSR and x87 control word, r15, r14, r13, r12, rbx, rbp, then
    // the return address (fiber_main); above it one empty slot, so that fiber_main starts
    // with the stack aligned as after a call (rsp = 8 mod 16)
    uintptr_t top = ((uintptr_t)(stack + kStack)) & ~(uintptr_t)15;
    uint64_t* p = (uint64_t*)(top - 72);
    uint32_t mxcsr;
    uint16_t fcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fcw));
    p[0] = (uint64_t)mxcsr | ((uint64_t)fcw << 32);
    for (int i = 1; i <= 6; i++) p[i] = 0;
    p[7] = (uint64_t)(void*)&fiber_main;
    p[8] = 0;
    c.sp = p;
#else
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = kStack;
    c.uc.uc_link = &sched.uc;
    makecontext(&c.uc, fiber_main, 0);
#endif
}

static void run_block(Block& b) {
    size_t n = b.fibers.size();
    for (size_t i = 0; i < n; i++) {
        Fiber& f = b.fibers[i];
        f.state = RUN;
        init_fiber(f.ctx, stack_for(i), b.sched);
    }
    size_t warps = (n + 31) / 32;
    for (;;) {
        // run every runnable fiber until it waits or exits
        for (size_t i = 0; i < n; i++) {
            Fiber& f = b.fibers[i];
            if (f.state != RUN) continue;
            b.cur = &f;
            switch_to(&b.sched, &f.ctx);
        }
        b.cur = nullptr;
        // warp barriers: released when every lane of the warp waits there
        bool released = false;
        for (size_t w = 0; w < warps; w++) {
            size_t lo = w * 32, hi = lo + 32 < n ? lo + 32 : n;
            size_t waiting = 0;
            for (size_t i = lo; i < hi; i++) waiting += b.fibers[i].state == AT_WARP_BARRIER;
            if (waiting == 0) continue;
            if (waiting != hi - lo) {
                b.cur = &b.fibers[lo];
                fail("a warp collective was not reached by every lane of the warp");
            }
            for (size_t i = lo; i < hi; i++) b.fibers[i].state = RUN;
            released = true;
        }
        if (released) continue;
        size_t at_barrier = 0, done = 0;
        for (auto& f : b.fibers) {
            at_barrier += f.state == AT_BLOCK_BARRIER;
            done += f.state == DONE;
        }
        if (done == n) return;
        if (at_barrier == n) {
            for (auto& f : b.fibers) f.state = RUN;
            continue;
        }
        for (auto& f : b.fibers)
            if (f.state == AT_BLOCK_BARRIER) b.cur = &f;
        fail("__syncthreads was not reached by every thread of the block");
    }
}

void launch(dim3 grid, dim3 block, size_t dyn_bytes, const std::function<void()>& body) {
    size_t threads = (size_t)block.x * block.y * block.z;
    if (threads == 0 || threads > 1024) fail("a block of 0 or more than 1024 threads");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("an empty grid");
    if (grid.y > 65535 || grid.z > 65535) fail("grid y or z above 65535");
    if (dyn_bytes > 227 * 1024) fail("more dynamic shared memory than any GPU has");
    Block b;
    b.bdim = block;
    b.gdim = grid;
    b.body = &body;
    b.fibers.resize(threads);
    b.scratch.assign(((threads + 31) / 32) * 32, 0);
    std::vector<char> smem(dyn_bytes + 16);
    b.smem = smem.data();
    for (unsigned z = 0, i = 0; z < block.z; z++)
        for (unsigned y = 0; y < block.y; y++)
            for (unsigned x = 0; x < block.x; x++, i++) {
                b.fibers[i].tid = dim3(x, y, z);
                b.fibers[i].linear = i;
            }
    Block* outer = g_block;
    g_block = &b;
    // blocks in a shuffled order (a different one at each launch): a GPU promises no order,
    // so a kernel whose result depends on it fails here too
    size_t n_blocks = (size_t)grid.x * grid.y * grid.z;
    std::vector<size_t> order(n_blocks);
    for (size_t i = 0; i < n_blocks; i++) order[i] = i;
    static std::atomic<uint64_t> launches{0};
    uint64_t r = 0x9E3779B97F4A7C15ull * (launches.fetch_add(1) + 1);
    for (size_t i = n_blocks; i > 1; i--) {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        std::swap(order[i - 1], order[r % i]);
    }
    for (size_t i : order) {
        unsigned x = (unsigned)(i % grid.x), y = (unsigned)(i / grid.x % grid.y),
                 z = (unsigned)(i / ((size_t)grid.x * grid.y));
        b.bid = dim3(x, y, z);
        std::memset(smem.data(), 0xff, smem.size());
        run_block(b);
    }
    g_block = outer;
}

// name -> (argument sizes, invoker)
struct Entry {
    std::vector<size_t> sizes;
    std::function<void(void**)> call;
};
static std::map<std::string, Entry>& registry() {
    static std::map<std::string, Entry> r;
    return r;
}
void add_entry(const char* name, std::vector<size_t> sizes, std::function<void(void**)> call) {
    registry()[name] = Entry{std::move(sizes), std::move(call)};
}

}  // namespace kexec

extern "C" void kexec_register_all();

// Every kernel registered, exactly once, before the registry is read (from any thread).
static void ensure_registered() {
    static bool once = (kexec_register_all(), true);
    (void)once;
}

// Launch kernel `name` with cuLaunchKernel's argument convention: `params[i]` points at argument
// i, whose size must be `sizes[i]`. Returns 0, or 1 for an unknown kernel, 2 for an argument
// list that does not match the kernel's parameters (a message goes to stderr).
extern "C" int kexec_launch(const char* name, const unsigned* grid, const unsigned* block, size_t dyn_bytes,
                            void** params, const size_t* sizes, size_t n_params) {
    ensure_registered();
    auto it = kexec::registry().find(name);
    if (it == kexec::registry().end()) {
        std::fprintf(stderr, "kexec: no kernel named %s\n", name);
        return 1;
    }
    const kexec::Entry& e = it->second;
    if (e.sizes.size() != n_params) {
        std::fprintf(stderr, "kexec: %s takes %zu arguments, given %zu\n", name, e.sizes.size(), n_params);
        return 2;
    }
    for (size_t i = 0; i < n_params; i++)
        if (e.sizes[i] != sizes[i]) {
            std::fprintf(stderr, "kexec: %s argument %zu is %zu bytes, given %zu\n", name, i, e.sizes[i],
                         sizes[i]);
            return 2;
        }
    kexec::launch(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), dyn_bytes,
                  [&] { e.call(params); });
    return 0;
}

// The kernels this library holds, one name per line.
extern "C" size_t kexec_kernel_names(char* buf, size_t cap) {
    ensure_registered();
    std::string all;
    for (auto& kv : kexec::registry()) all += kv.first + "\n";
    if (buf && cap > 0) {
        size_t n = all.size() < cap - 1 ? all.size() : cap - 1;
        std::memcpy(buf, all.data(), n);
        buf[n] = 0;
    }
    return all.size() + 1;
}
