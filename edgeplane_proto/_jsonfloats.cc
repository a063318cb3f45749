// Large JSON number arrays read on several cores, without the interpreter lock.
//
// A v2 JSON request carries its tensors as flat number arrays: 715 KB of text for a
// 64 x 1024 float32 input. Parsing those numbers is what such a request costs (about 20 ns
// a number on one core here, simdjson's parse and this one alike), and every parser on the
// package index holds the interpreter lock while it runs. `split` finds the arrays of a
// body that are large, parses each one in chunks on several threads with the lock
// released, and gives back the rest of the body (a few hundred bytes) with a marker string
// where each array was; edgeplane_proto/oip.py parses that rest as before and puts the
// arrays back. Measured in docs/benchmarks.md ("v2 JSON tensors").
//
// Numbers are read exactly as a JSON parser reads them: the strict JSON grammar, each value
// the double nearest to the decimal (Clinger's exact fast path when the digits fit, else
// std::from_chars, which rounds correctly). Anything else -- a number out of range, a
// nested or non-numeric element, a malformed array, a string left open -- makes `split`
// return None and the caller reads the body the ordinary way, with its own errors.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr double kPow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                             1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

constexpr int kMaxThreads = 8;

inline bool is_digit(char c) { return static_cast<unsigned char>(c - '0') < 10; }
inline bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// Whether the eight bytes of a little-endian word are all ASCII digits, and their value.
inline bool eight_digits(uint64_t word) {
    return (((word + 0x4646464646464646ULL) | (word - 0x3030303030303030ULL)) & 0x8080808080808080ULL) == 0;
}

inline uint64_t value_of_eight(uint64_t word) {
    word -= 0x3030303030303030ULL;
    word = word * 10 + (word >> 8);  // pairs of digits
    return (((word & 0x000000FF000000FFULL) * 0x000F424000000064ULL) +
            (((word >> 16) & 0x000000FF000000FFULL) * 0x0000271000000001ULL)) >> 32;
}

// One JSON number at p (strict grammar); its end, or nullptr when there is none or it is
// out of the range of a double.
const char* parse_number(const char* p, const char* end, double* out) {
    const char* start = p;
    const bool negative = p < end && *p == '-';
    if (negative) ++p;
    if (p == end) return nullptr;
    uint64_t mantissa = 0;  // exact while digits <= 19; only used when digits <= 15
    int digits = 0;         // digits read into mantissa, leading zeros of a fraction included
    int exponent = 0;
    if (*p == '0') {
        ++p;
    } else if (is_digit(*p)) {
        const char* first = p;
        for (; p < end && is_digit(*p); ++p) mantissa = mantissa * 10 + static_cast<uint64_t>(*p - '0');
        digits = static_cast<int>(p - first);
    } else {
        return nullptr;
    }
    const bool integer = p == end || (*p != '.' && *p != 'e' && *p != 'E');
    if (p < end && *p == '.') {
        const char* first = ++p;
        uint64_t word;
        while (end - p >= 8 && (std::memcpy(&word, p, 8), eight_digits(word))) {
            mantissa = mantissa * 100000000 + value_of_eight(word);
            p += 8;
        }
        for (; p < end && is_digit(*p); ++p) mantissa = mantissa * 10 + static_cast<uint64_t>(*p - '0');
        if (p == first) return nullptr;
        digits += static_cast<int>(p - first);
        exponent = -static_cast<int>(std::min<ptrdiff_t>(p - first, 100000));
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        ++p;
        bool negative_exponent = false;
        if (p < end && (*p == '+' || *p == '-')) negative_exponent = *p++ == '-';
        const char* first = p;
        int value = 0;
        for (; p < end && is_digit(*p); ++p) {
            if (value < 100000) value = value * 10 + (*p - '0');
        }
        if (p == first) return nullptr;
        exponent += negative_exponent ? -value : value;
    }
    // Exact: a mantissa below 10**15 (< 2**53) and a power of ten up to 1e22 are both
    // doubles, so one multiplication or division rounds the exact value once, correctly.
    if (digits <= 15 && exponent >= -22 && exponent <= 22) {
        double value = static_cast<double>(mantissa);
        value = exponent < 0 ? value / kPow10[-exponent] : value * kPow10[exponent];
        // "-0" is the integer zero to a JSON parser (simdjson, orjson): +0.0, where "-0.0" is -0.0
        *out = negative && !(integer && mantissa == 0) ? -value : value;
        return p;
    }
    auto result = std::from_chars(start, p, *out);
    if (result.ec != std::errc() || result.ptr != p) return nullptr;  // out of range
    return p;
}

// `ws number ws (, ws number ws)*` over [p, end) into out; false if the text is anything else.
bool parse_list(const char* p, const char* end, std::vector<double>* out) {
    out->clear();
    for (;;) {
        while (p < end && is_space(*p)) ++p;
        double value;
        p = parse_number(p, end, &value);
        if (p == nullptr) return false;
        out->push_back(value);
        while (p < end && is_space(*p)) ++p;
        if (p == end) return true;
        if (*p++ != ',') return false;
    }
}

struct Array {
    Py_ssize_t open, close;         // offsets of its '[' and ']'
    std::vector<const char*> cuts;  // chunk bounds: chunk i is (cuts[i], cuts[i + 1]), cuts[i] a ','
};

// Scratch vectors are kept per calling thread, so their memory is not mapped and faulted in
// again for each body; what a body needed beyond kKeptBytes is returned after it.
constexpr size_t kKeptBytes = 1u << 20;
thread_local std::vector<std::vector<double>> scratch;

int usable_cpus() {
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) return 1;
    return std::max(1, CPU_COUNT(&allowed));
}

// Worker threads are kept off the caller's CPU: a new thread otherwise starts on its
// creator's CPU and often waits there until the creator's own chunk is done (here: 0.6 ms
// late in half the calls).
void keep_off(std::thread& thread, int cpu) {
    cpu_set_t allowed;
    if (cpu < 0 || sched_getaffinity(0, sizeof allowed, &allowed) != 0 || CPU_COUNT(&allowed) < 2) return;
    CPU_CLR(cpu, &allowed);
    pthread_setaffinity_np(thread.native_handle(), sizeof allowed, &allowed);
}

// Every chunk of every array parsed into outs (one per chunk, in order); false when one is
// not a plain number list, or memory or a thread could not be had. Throws nothing.
bool parse_chunks(const std::vector<Array>& arrays, const std::vector<std::vector<double>*>& outs) noexcept {
    struct Job {
        const char* begin;
        const char* end;
        std::vector<double>* out;
    };
    try {
        std::vector<Job> jobs;
        size_t k = 0;
        for (const Array& array : arrays) {
            for (size_t i = 0; i + 1 < array.cuts.size(); ++i) {
                const char* begin = i == 0 ? array.cuts[i] : array.cuts[i] + 1;  // past the ','
                jobs.push_back({begin, array.cuts[i + 1], outs[k++]});
            }
        }
        const size_t threads = std::min<size_t>(jobs.size(), static_cast<size_t>(std::min(usable_cpus(), kMaxThreads)));
        std::vector<char> ok(jobs.size(), 0);
        auto work = [&](size_t first) noexcept {
            for (size_t j = first; j < jobs.size(); j += threads) {
                try {
                    ok[j] = parse_list(jobs[j].begin, jobs[j].end, jobs[j].out);
                } catch (...) {  // std::bad_alloc: this chunk fails, and with it the body
                    ok[j] = 0;
                }
            }
        };
        std::vector<std::thread> workers;
        const int cpu = sched_getcpu();
        bool started = true;
        for (size_t t = 1; t < threads; ++t) {
            try {
                workers.emplace_back(work, t);
            } catch (...) {  // no thread to be had: the body is read the ordinary way
                started = false;
                break;
            }
            keep_off(workers.back(), cpu);
        }
        work(0);
        for (std::thread& worker : workers) worker.join();
        return started && std::all_of(ok.begin(), ok.end(), [](char c) { return c != 0; });
    } catch (...) {
        return false;
    }
}

// The number arrays of body (outside strings) of at least min_chars characters, each cut
// into chunks of about chunk_chars; false if the body ends inside a string or an array.
bool find_arrays(const char* body, Py_ssize_t size, Py_ssize_t min_chars, Py_ssize_t chunk_chars,
                 std::vector<Array>* arrays) {
    const Py_ssize_t chunks_max = std::min(usable_cpus(), kMaxThreads);
    for (Py_ssize_t i = 0; i < size; ++i) {
        const char c = body[i];
        if (c == '"') {
            for (++i; i < size && body[i] != '"'; ++i) {
                if (body[i] == '\\') ++i;
            }
            if (i >= size) return false;
            continue;
        }
        if (c != '[') continue;
        Py_ssize_t j = i + 1;
        while (j < size && is_space(body[j])) ++j;
        if (j == size) return false;
        if (body[j] != '-' && !is_digit(body[j])) continue;
        const char* close = static_cast<const char*>(std::memchr(body + j, ']', static_cast<size_t>(size - j)));
        if (close == nullptr) return false;
        const Py_ssize_t length = close - (body + i);
        if (length < min_chars) continue;  // small: read over character by character
        Array array{i, close - body, {body + i + 1}};
        const Py_ssize_t chunks = std::clamp<Py_ssize_t>(length / chunk_chars, 1, chunks_max);
        for (Py_ssize_t n = 1; n < chunks; ++n) {
            const char* from = body + i + 1 + length * n / chunks;
            const char* comma = static_cast<const char*>(std::memchr(from, ',', static_cast<size_t>(close - from)));
            if (comma == nullptr) break;
            if (comma > array.cuts.back()) array.cuts.push_back(comma);
        }
        array.cuts.push_back(close);
        arrays->push_back(std::move(array));
        i = close - body;
    }
    return true;
}

// (rest, values, spans) for the arrays found and parsed, as split() documents; nullptr with
// a Python error set if an object could not be made.
PyObject* build_result(const char* body, Py_ssize_t size, const std::vector<Array>& arrays,
                       const std::vector<std::vector<double>*>& outs, const char* marker, Py_ssize_t marker_size) {
    std::string rest;
    PyObject* values = PyList_New(0);
    PyObject* spans = PyList_New(0);
    bool failed = values == nullptr || spans == nullptr;
    Py_ssize_t last = 0;
    size_t k = 0;
    for (size_t a = 0; a < arrays.size() && !failed; ++a) {
        const Array& array = arrays[a];
        rest.append(body + last, static_cast<size_t>(array.open - last));
        rest.push_back('"');
        rest.append(marker, static_cast<size_t>(marker_size));
        rest.append(std::to_string(a));
        rest.push_back('"');
        last = array.close + 1;
        const size_t chunks = array.cuts.size() - 1;
        size_t count = 0;
        for (size_t i = 0; i < chunks; ++i) count += outs[k + i]->size();
        PyObject* data = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(count * sizeof(double)));
        PyObject* span = Py_BuildValue("(nn)", array.open, array.close + 1);
        failed = data == nullptr || span == nullptr;
        if (!failed) {
            char* to = PyBytes_AS_STRING(data);
            for (size_t i = 0; i < chunks; ++i) {
                const std::vector<double>& part = *outs[k + i];
                if (!part.empty()) std::memcpy(to, part.data(), part.size() * sizeof(double));
                to += part.size() * sizeof(double);
            }
            failed = PyList_Append(values, data) != 0 || PyList_Append(spans, span) != 0;
        }
        k += chunks;
        Py_XDECREF(data);
        Py_XDECREF(span);
    }
    PyObject* result = nullptr;
    if (!failed) {
        rest.append(body + last, static_cast<size_t>(size - last));
        PyObject* head = PyBytes_FromStringAndSize(rest.data(), static_cast<Py_ssize_t>(rest.size()));
        if (head != nullptr) result = Py_BuildValue("(NOO)", head, values, spans);
    }
    Py_XDECREF(values);
    Py_XDECREF(spans);
    return result;
}

PyObject* split(PyObject*, PyObject* args) {
    Py_buffer view;
    Py_ssize_t min_chars, chunk_chars = 64 * 1024;
    const char* marker;
    Py_ssize_t marker_size;
    if (!PyArg_ParseTuple(args, "y*ns#|n", &view, &min_chars, &marker, &marker_size, &chunk_chars)) return nullptr;
    const char* body = static_cast<const char*>(view.buf);
    std::vector<Array> arrays;
    std::vector<std::vector<double>*> outs;
    bool parsed = false;
    Py_BEGIN_ALLOW_THREADS
    try {
        if (find_arrays(body, view.len, std::max<Py_ssize_t>(min_chars, 2), std::max<Py_ssize_t>(chunk_chars, 1), &arrays) &&
            !arrays.empty()) {
            size_t jobs = 0;
            for (const Array& array : arrays) jobs += array.cuts.size() - 1;
            if (scratch.size() < jobs) scratch.resize(jobs);
            for (size_t k = 0; k < jobs; ++k) outs.push_back(&scratch[k]);
            parsed = parse_chunks(arrays, outs);
        }
    } catch (...) {  // std::bad_alloc: the body is read the ordinary way
        parsed = false;
    }
    Py_END_ALLOW_THREADS
    PyObject* result = nullptr;
    if (parsed) {
        try {
            result = build_result(body, view.len, arrays, outs, marker, marker_size);
        } catch (...) {
            result = PyErr_NoMemory();
        }
    }
    for (std::vector<double>& part : scratch) {
        if (part.capacity() * sizeof(double) > kKeptBytes) std::vector<double>().swap(part);
    }
    PyBuffer_Release(&view);
    if (result == nullptr && !PyErr_Occurred()) Py_RETURN_NONE;
    return result;
}

PyMethodDef methods[] = {
    {"split", split, METH_VARARGS,
     "split(body, min_chars, marker, chunk_chars=65536) -> (rest, values, spans) | None\n\n"
     "The number arrays of at least min_chars characters in a JSON body, outside strings,\n"
     "parsed in chunks of about chunk_chars on up to one thread per usable CPU (at most 8):\n"
     "rest is the body with each such array replaced by the string marker + its index,\n"
     "values holds each array's numbers as float64 bytes, spans each array's (start, end)\n"
     "offsets in body. None when the body has no such array, or one of them is not a flat\n"
     "list of JSON numbers within the range of a double."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jsonfloats", "Large JSON number arrays read on several cores.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__jsonfloats() { return PyModule_Create(&module); }
