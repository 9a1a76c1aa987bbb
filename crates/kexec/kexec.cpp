// kexec's scheduler: blocks one after another on the calling thread, a block's threads as
// ucontext fibers switched at barriers. See kexec.h.
#include "kexec.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <map>
#include <string>
#include <vector>

#include "registry.h"

namespace kexec {

enum State { RUN, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };

struct Fiber {
    ucontext_t ctx;
    dim3 tid;
    unsigned linear;
    State state;
};

struct Block {
    dim3 bid, bdim, gdim;
    std::vector<Fiber> fibers;
    ucontext_t sched;
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

static void wait_as(State s) {
    Block* b = g_block;
    Fiber* f = b->cur;
    f->state = s;
    swapcontext(&f->ctx, &b->sched);
}

void syncthreads() { wait_as(AT_BLOCK_BARRIER); }
void warp_barrier() { wait_as(AT_WARP_BARRIER); }

static void fiber_main() {
    Block* b = g_block;
    (*b->body)();
    b->cur->state = DONE;
    // returning resumes uc_link: the scheduler
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

static void run_block(Block& b) {
    size_t n = b.fibers.size();
    for (size_t i = 0; i < n; i++) {
        Fiber& f = b.fibers[i];
        f.state = RUN;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stack_for(i);
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = &b.sched;
        makecontext(&f.ctx, fiber_main, 0);
    }
    size_t warps = (n + 31) / 32;
    for (;;) {
        // run every runnable fiber until it waits or exits
        for (size_t i = 0; i < n; i++) {
            Fiber& f = b.fibers[i];
            if (f.state != RUN) continue;
            b.cur = &f;
            swapcontext(&b.sched, &f.ctx);
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
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
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
