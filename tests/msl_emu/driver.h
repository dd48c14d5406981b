// driver.h: what both emulation drivers share: the array file format, guarded buffers, the grid launch.
//
// Array file (written by tests/msl_emu.rs, read here; outputs use the same format): the magic "ECQEMU01",
// then records until the end of the file: name length (u32), name bytes, byte length (u64), bytes. All
// integers little-endian.
//
// Buffers: each array is copied into its own mapping that ends exactly where a PROT_NONE guard page
// begins, and input arrays are made read-only, so a kernel that reads past the end of a buffer or writes to
// an input dies with SIGSEGV instead of passing by luck.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace driver {

[[noreturn]] inline void die(const std::string& message) {
    std::fprintf(stderr, "msl-emu driver: %s\n", message.c_str());
    std::exit(2);
}

using Arrays = std::map<std::string, std::vector<unsigned char>>;

inline Arrays read_arrays(const char* path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) die(std::string("cannot open ") + path);
    std::vector<unsigned char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (data.size() < 8 || std::memcmp(data.data(), "ECQEMU01", 8) != 0) die("bad magic in input file");
    Arrays arrays;
    size_t at = 8;
    auto take = [&](size_t n) {
        if (data.size() - at < n) die("truncated input file");
        const unsigned char* p = data.data() + at;
        at += n;
        return p;
    };
    while (at < data.size()) {
        uint32_t name_len;
        std::memcpy(&name_len, take(4), 4);
        std::string name(reinterpret_cast<const char*>(take(name_len)), name_len);
        uint64_t len;
        std::memcpy(&len, take(8), 8);
        const unsigned char* bytes = take(len);
        arrays[name].assign(bytes, bytes + len);
    }
    return arrays;
}

inline void write_arrays(const char* path, const std::vector<std::pair<std::string, std::vector<unsigned char>>>& arrays) {
    std::ofstream out(path, std::ios::binary);
    if (!out) die(std::string("cannot create ") + path);
    out.write("ECQEMU01", 8);
    for (const auto& [name, bytes] : arrays) {
        uint32_t name_len = uint32_t(name.size());
        uint64_t len = bytes.size();
        out.write(reinterpret_cast<const char*>(&name_len), 4);
        out.write(name.data(), name_len);
        out.write(reinterpret_cast<const char*>(&len), 8);
        out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(len));
    }
    if (!out) die(std::string("cannot write ") + path);
}

// A buffer whose last byte sits just below a PROT_NONE page.
class GuardedBuffer {
  public:
    GuardedBuffer(const std::vector<unsigned char>& init, size_t bytes, bool read_only) : bytes_(bytes) {
        const size_t page = size_t(sysconf(_SC_PAGESIZE));
        data_pages_ = (bytes + page - 1) / page;
        total_ = (data_pages_ + 2) * page;  // guard, data, guard
        void* m = mmap(nullptr, total_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) die("mmap failed");
        base_ = static_cast<unsigned char*>(m);
        if (data_pages_ > 0 && mprotect(base_ + page, data_pages_ * page, PROT_READ | PROT_WRITE) != 0) {
            die("mprotect failed");
        }
        data_ = base_ + page + data_pages_ * page - bytes;
        std::memcpy(data_, init.data(), std::min(init.size(), bytes));
        if (read_only && data_pages_ > 0 && mprotect(base_ + page, data_pages_ * page, PROT_READ) != 0) {
            die("mprotect failed");
        }
    }
    GuardedBuffer(const GuardedBuffer&) = delete;
    GuardedBuffer& operator=(const GuardedBuffer&) = delete;
    ~GuardedBuffer() { munmap(base_, total_); }

    template <class T>
    T* as() const {
        return reinterpret_cast<T*>(data_);
    }
    std::vector<unsigned char> bytes() const { return std::vector<unsigned char>(data_, data_ + bytes_); }

  private:
    size_t bytes_ = 0, data_pages_ = 0, total_ = 0;
    unsigned char* base_ = nullptr;
    unsigned char* data_ = nullptr;
};

// An input array as a read-only guarded buffer; `element` checks the length is whole elements.
inline GuardedBuffer* input(const Arrays& arrays, const std::string& name, size_t element) {
    auto it = arrays.find(name);
    if (it == arrays.end()) die("input array " + name + " missing");
    if (it->second.size() % element != 0) die("input array " + name + " is not whole elements");
    return new GuardedBuffer(it->second, it->second.size(), true);
}

inline uint32_t scalar(const Arrays& arrays, const std::string& name) {
    auto it = arrays.find(name);
    if (it == arrays.end() || it->second.size() != 4) die("scalar " + name + " missing");
    uint32_t v;
    std::memcpy(&v, it->second.data(), 4);
    return v;
}

// Launches `threadgroups` threadgroups of `threads` threads on `workers` OS threads. `body(threadgroup, tid)`
// runs one GPU thread; each OS thread runs whole threadgroups, one at a time, through the SIMT scheduler.
inline void launch(uint32_t threadgroups, uint32_t threads, uint32_t workers,
                   const std::function<void(uint32_t, uint32_t)>& body) {
    std::atomic<uint32_t> next{0};
    auto work = [&]() {
        emu::Threadgroup group;
        for (uint32_t tg; (tg = next.fetch_add(1)) < threadgroups;) {
            std::function<void(uint)> thread_body = [&](uint tid) { body(tg, tid); };
            emu::run_threadgroup(group, threads, thread_body);
        }
    };
    std::vector<std::thread> pool;
    for (uint32_t w = 1; w < std::max(workers, 1u); w++) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
}

}  // namespace driver
