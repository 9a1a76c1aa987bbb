// Registration of a kernel: its argument sizes and a call that unpacks cuLaunchKernel-style
// argument pointers. Included by the generated per-file registration units.
#pragma once

#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

namespace kexec {

void add_entry(const char* name, std::vector<size_t> sizes, std::function<void(void**)> call);

template <class... A, size_t... I>
inline void invoke(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*reinterpret_cast<std::remove_reference_t<A>*>(p[I])...);
}

template <class... A>
inline void add(const char* name, void (*f)(A...)) {
    add_entry(name, std::vector<size_t>{sizeof(A)...},
              [f](void** p) { invoke(f, p, std::index_sequence_for<A...>{}); });
}

}  // namespace kexec
