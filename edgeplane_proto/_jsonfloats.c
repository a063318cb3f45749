/* Large JSON number arrays read on several cores, without the interpreter lock.
 *
 * A v2 JSON request carries its tensors as flat number arrays: 715 KB of text for a
 * 64 x 1024 float32 input. Parsing those numbers is what such a request costs (about 15-20
 * ns a number on one core here, simdjson's parse and this one alike), and every JSON parser
 * on the package index holds the interpreter lock while it runs. `split` finds the large
 * arrays of a body, parses each in chunks on several threads with the lock released, and
 * gives back the rest of the body (a few hundred bytes) with a marker string where each
 * array was; edgeplane_proto/oip_reader.py parses that rest as before and puts the arrays back.
 * Measured in docs/benchmarks.md ("v2 JSON tensors: the native reader").
 *
 * Numbers are read as a JSON parser reads them: the strict JSON grammar, each value the
 * double nearest to the decimal (Clinger's exact fast path when the digits fit, else
 * strtod in the C locale, which rounds correctly), the integer "-0" as +0.0. Anything else
 * -- a number out of range, a nested or non-numeric element, a malformed array, a string
 * left open -- makes `split` return None, and the caller reads the body the ordinary way,
 * with its own errors.
 */

#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <locale.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_THREADS = 8 };

/* Scratch kept per calling thread beyond this is returned after each body. */
#define KEPT_BYTES ((size_t)1 << 20)

static const double POW10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                               1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

static locale_t c_locale;

static inline bool is_digit(char c) { return (unsigned char)(c - '0') < 10; }
static inline bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Whether the eight bytes of a little-endian word are all ASCII digits, and their value. */
static inline bool eight_digits(uint64_t word) {
    return (((word + 0x4646464646464646ULL) | (word - 0x3030303030303030ULL)) & 0x8080808080808080ULL) == 0;
}

static inline uint64_t value_of_eight(uint64_t word) {
    word -= 0x3030303030303030ULL;
    word = word * 10 + (word >> 8); /* pairs of digits */
    return (((word & 0x000000FF000000FFULL) * 0x000F424000000064ULL) +
            (((word >> 16) & 0x000000FF000000FFULL) * 0x0000271000000001ULL)) >> 32;
}

/* One JSON number at p (strict grammar): its end, or NULL when there is none or it is out of
 * the range of a double. */
static const char *parse_number(const char *p, const char *end, double *out) {
    const char *start = p;
    const bool negative = p < end && *p == '-';
    if (negative) ++p;
    if (p == end) return NULL;
    uint64_t mantissa = 0; /* exact while digits <= 19; only used when digits <= 15 */
    ptrdiff_t digits = 0;  /* digits read into mantissa, leading zeros of a fraction included */
    long exponent = 0;
    if (*p == '0') {
        ++p;
    } else if (is_digit(*p)) {
        const char *first = p;
        for (; p < end && is_digit(*p); ++p) mantissa = mantissa * 10 + (uint64_t)(*p - '0');
        digits = p - first;
    } else {
        return NULL;
    }
    const bool integer = p == end || (*p != '.' && *p != 'e' && *p != 'E');
    if (p < end && *p == '.') {
        const char *first = ++p;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        uint64_t word;
        while (end - p >= 8 && (memcpy(&word, p, 8), eight_digits(word))) {
            mantissa = mantissa * 100000000 + value_of_eight(word);
            p += 8;
        }
#endif
        for (; p < end && is_digit(*p); ++p) mantissa = mantissa * 10 + (uint64_t)(*p - '0');
        if (p == first) return NULL;
        digits += p - first;
        exponent = -(long)(p - first < 100000 ? p - first : 100000);
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        ++p;
        bool negative_exponent = false;
        if (p < end && (*p == '+' || *p == '-')) negative_exponent = *p++ == '-';
        const char *first = p;
        long value = 0;
        for (; p < end && is_digit(*p); ++p) {
            if (value < 100000) value = value * 10 + (*p - '0');
        }
        if (p == first) return NULL;
        exponent += negative_exponent ? -value : value;
    }
    /* Exact: a mantissa below 10**15 (< 2**53) and a power of ten up to 1e22 are both
     * doubles, so one multiplication or division rounds the exact value once, correctly. */
    if (digits <= 15 && exponent >= -22 && exponent <= 22) {
        double value = (double)mantissa;
        value = exponent < 0 ? value / POW10[-exponent] : value * POW10[exponent];
        /* "-0" is the integer zero to a JSON parser (simdjson, orjson): +0.0; "-0.0" is -0.0 */
        *out = negative && !(integer && mantissa == 0) ? -value : value;
        return p;
    }
    char *stop;
    errno = 0;
    *out = strtod_l(start, &stop, c_locale);
    if (stop != p || errno == ERANGE) return NULL; /* out of range (over- or underflow) */
    return p;
}

typedef struct {
    double *data;
    size_t size, capacity;
} Values;

static bool push(Values *values, double value) {
    if (values->size == values->capacity) {
        size_t capacity = values->capacity ? values->capacity * 2 : 4096;
        double *data = realloc(values->data, capacity * sizeof(double));
        if (data == NULL) return false;
        values->data = data;
        values->capacity = capacity;
    }
    values->data[values->size++] = value;
    return true;
}

/* `ws number ws (, ws number ws)*` over [p, end) into out; false if the text is anything
 * else or memory ran out. */
static bool parse_list(const char *p, const char *end, Values *out) {
    out->size = 0;
    for (;;) {
        while (p < end && is_space(*p)) ++p;
        double value;
        p = parse_number(p, end, &value);
        if (p == NULL || !push(out, value)) return false;
        while (p < end && is_space(*p)) ++p;
        if (p == end) return true;
        if (*p++ != ',') return false;
    }
}

/* Scratch values kept per calling thread (freed with it), so their memory is not mapped and
 * faulted in again for each body. */
typedef struct {
    Values parts[MAX_THREADS * 4];
} Scratch;

static pthread_key_t scratch_key;

static void free_scratch(void *pointer) {
    Scratch *scratch = pointer;
    for (size_t i = 0; i < sizeof scratch->parts / sizeof scratch->parts[0]; ++i) free(scratch->parts[i].data);
    free(scratch);
}

static Scratch *thread_scratch(void) {
    Scratch *scratch = pthread_getspecific(scratch_key);
    if (scratch == NULL) {
        scratch = calloc(1, sizeof *scratch);
        if (scratch != NULL && pthread_setspecific(scratch_key, scratch) != 0) {
            free(scratch);
            scratch = NULL;
        }
    }
    return scratch;
}

static void trim_scratch(Scratch *scratch) {
    for (size_t i = 0; i < sizeof scratch->parts / sizeof scratch->parts[0]; ++i) {
        Values *part = &scratch->parts[i];
        if (part->capacity * sizeof(double) > KEPT_BYTES) {
            free(part->data);
            *part = (Values){0};
        }
    }
}

typedef struct {
    Py_ssize_t open, close;                /* offsets of its '[' and ']' */
    const char *cuts[MAX_THREADS + 1];     /* chunk i is (cuts[i], cuts[i + 1]); cuts[i > 0] is a ',' */
    int chunks;
} Array;

typedef struct {
    const char *begin, *end;
    Values *out;
    bool ok;
} Job;

typedef struct {
    Job *jobs;
    int count, first, stride;
} Worker;

static void *work(void *argument) {
    Worker *worker = argument;
    for (int j = worker->first; j < worker->count; j += worker->stride) {
        Job *job = &worker->jobs[j];
        job->ok = parse_list(job->begin, job->end, job->out);
    }
    return NULL;
}

/* The CPUs this process may run on (read once per body), and how many threads to use. */
typedef struct {
    cpu_set_t allowed;
    bool known;
    int threads; /* 1 .. MAX_THREADS */
} Cpus;

static Cpus usable_cpus(void) {
    Cpus cpus = {.threads = 1};
    cpus.known = sched_getaffinity(0, sizeof cpus.allowed, &cpus.allowed) == 0;
    if (cpus.known) {
        const int count = CPU_COUNT(&cpus.allowed);
        cpus.threads = count < 1 ? 1 : count > MAX_THREADS ? MAX_THREADS : count;
    }
    return cpus;
}

/* Every job run, on up to one thread per usable CPU; false when one is not a plain number
 * list, or memory or a thread could not be had. Worker threads are started off the
 * caller's CPU: a new thread otherwise starts on its creator's CPU and often waits there
 * until the creator's own chunk is done (0.6 ms late in half the calls here). */
static bool run_jobs(Job *jobs, int count, const Cpus *cpus) {
    const int threads = cpus->threads < count ? cpus->threads : count;
    Worker workers[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    pthread_attr_t attributes;
    bool attributes_made = pthread_attr_init(&attributes) == 0;
    cpu_set_t elsewhere = cpus->allowed;
    const int cpu = sched_getcpu();
    if (attributes_made && cpu >= 0 && cpus->known && CPU_COUNT(&elsewhere) > 1) {
        CPU_CLR(cpu, &elsewhere);
        pthread_attr_setaffinity_np(&attributes, sizeof elsewhere, &elsewhere);
    }
    bool started = true;
    int running = 0;
    for (int t = 0; t < threads; ++t) workers[t] = (Worker){jobs, count, t, threads};
    for (int t = 1; t < threads; ++t) {
        if (pthread_create(&ids[t], attributes_made ? &attributes : NULL, work, &workers[t]) != 0) {
            started = false; /* no thread to be had: the body is read the ordinary way */
            break;
        }
        ++running;
    }
    if (started) work(&workers[0]);
    for (int t = 1; t <= running; ++t) pthread_join(ids[t], NULL);
    if (attributes_made) pthread_attr_destroy(&attributes);
    if (!started) return false;
    for (int j = 0; j < count; ++j) {
        if (!jobs[j].ok) return false;
    }
    return true;
}

/* The number arrays of body (outside strings) of at least min_chars characters, each cut
 * into chunks of about chunk_chars, appended to *arrays; false if the body ends inside a
 * string or an array, or memory ran out. */
static bool find_arrays(const char *body, Py_ssize_t size, Py_ssize_t min_chars, Py_ssize_t chunk_chars, int chunks_max,
                        Array **arrays, size_t *count) {
    size_t capacity = 0;
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
        const char *close = memchr(body + j, ']', (size_t)(size - j));
        if (close == NULL) return false;
        const Py_ssize_t length = close - (body + i);
        if (length < min_chars) continue; /* small: read over character by character */
        if (*count == capacity) {
            capacity = capacity ? capacity * 2 : 4;
            Array *grown = realloc(*arrays, capacity * sizeof(Array));
            if (grown == NULL) return false;
            *arrays = grown;
        }
        Array *array = &(*arrays)[(*count)++];
        array->open = i;
        array->close = close - body;
        array->cuts[0] = body + i + 1;
        array->chunks = 0;
        Py_ssize_t chunks = length / chunk_chars;
        chunks = chunks < 1 ? 1 : chunks > chunks_max ? chunks_max : chunks;
        for (Py_ssize_t n = 1; n < chunks; ++n) {
            const char *from = body + i + 1 + length * n / chunks;
            const char *comma = memchr(from, ',', (size_t)(close - from));
            if (comma == NULL) break;
            if (comma > array->cuts[array->chunks]) array->cuts[++array->chunks] = comma;
        }
        array->cuts[++array->chunks] = close;
        i = close - body;
    }
    return true;
}

/* (rest, values, spans) for the arrays found and parsed, as split() documents; NULL with a
 * Python error set if an object could not be made. */
static PyObject *build_result(const char *body, Py_ssize_t size, const Array *arrays, size_t count, Values *parts,
                              const char *marker, Py_ssize_t marker_size) {
    char index[24];
    Py_ssize_t rest_size = size;
    for (size_t a = 0; a < count; ++a) {
        rest_size -= arrays[a].close + 1 - arrays[a].open;
        rest_size += marker_size + 2 + snprintf(index, sizeof index, "%zu", a);
    }
    PyObject *rest = PyBytes_FromStringAndSize(NULL, rest_size);
    PyObject *values = PyList_New((Py_ssize_t)count);
    PyObject *spans = PyList_New((Py_ssize_t)count);
    if (rest == NULL || values == NULL || spans == NULL) goto failed;
    char *to = PyBytes_AS_STRING(rest);
    Py_ssize_t last = 0;
    size_t k = 0;
    for (size_t a = 0; a < count; ++a) {
        const Array *array = &arrays[a];
        memcpy(to, body + last, (size_t)(array->open - last));
        to += array->open - last;
        *to++ = '"';
        memcpy(to, marker, (size_t)marker_size);
        to += marker_size;
        const int written = snprintf(index, sizeof index, "%zu", a);
        memcpy(to, index, (size_t)written);
        to += written;
        *to++ = '"';
        last = array->close + 1;
        size_t numbers = 0;
        for (int i = 0; i < array->chunks; ++i) numbers += parts[k + (size_t)i].size;
        PyObject *data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(numbers * sizeof(double)));
        PyObject *span = Py_BuildValue("(nn)", array->open, array->close + 1);
        if (data == NULL || span == NULL) {
            Py_XDECREF(data);
            Py_XDECREF(span);
            goto failed;
        }
        char *into = PyBytes_AS_STRING(data);
        for (int i = 0; i < array->chunks; ++i, ++k) {
            if (parts[k].size) memcpy(into, parts[k].data, parts[k].size * sizeof(double));
            into += parts[k].size * sizeof(double);
        }
        PyList_SET_ITEM(values, (Py_ssize_t)a, data);
        PyList_SET_ITEM(spans, (Py_ssize_t)a, span);
    }
    memcpy(to, body + last, (size_t)(size - last));
    return Py_BuildValue("(NNN)", rest, values, spans);
failed:
    Py_XDECREF(rest);
    Py_XDECREF(values);
    Py_XDECREF(spans);
    return NULL;
}

static PyObject *split(PyObject *module, PyObject *args) {
    (void)module;
    Py_buffer view;
    Py_ssize_t min_chars, chunk_chars = 64 * 1024;
    const char *marker;
    Py_ssize_t marker_size;
    if (!PyArg_ParseTuple(args, "y*ns#|n", &view, &min_chars, &marker, &marker_size, &chunk_chars)) return NULL;
    const char *body = view.buf;
    Array *arrays = NULL;
    size_t count = 0, jobs = 0;
    Scratch *scratch = NULL;
    Values *parts = NULL;
    bool parsed = false, own_parts = false;
    Py_BEGIN_ALLOW_THREADS
    const Cpus cpus = usable_cpus();
    scratch = thread_scratch();
    if (scratch != NULL &&
        find_arrays(body, view.len, min_chars < 2 ? 2 : min_chars, chunk_chars < 1 ? 1 : chunk_chars, cpus.threads, &arrays,
                    &count) &&
        count > 0) {
        for (size_t a = 0; a < count; ++a) jobs += (size_t)arrays[a].chunks;
        own_parts = jobs > sizeof scratch->parts / sizeof scratch->parts[0]; /* many large arrays: not kept */
        parts = own_parts ? calloc(jobs, sizeof(Values)) : scratch->parts;
        Job *list = calloc(jobs, sizeof(Job));
        if (parts != NULL && list != NULL) {
            size_t k = 0;
            for (size_t a = 0; a < count; ++a) {
                for (int i = 0; i < arrays[a].chunks; ++i, ++k) {
                    const char *begin = i == 0 ? arrays[a].cuts[0] : arrays[a].cuts[i] + 1; /* past the ',' */
                    list[k] = (Job){begin, arrays[a].cuts[i + 1], &parts[k], false};
                }
            }
            parsed = run_jobs(list, (int)jobs, &cpus);
        }
        free(list);
    }
    Py_END_ALLOW_THREADS
    PyObject *result = parsed ? build_result(body, view.len, arrays, count, parts, marker, marker_size) : NULL;
    if (own_parts && parts != NULL) {
        for (size_t i = 0; i < jobs; ++i) free(parts[i].data);
        free(parts);
    }
    if (scratch != NULL) trim_scratch(scratch);
    free(arrays);
    PyBuffer_Release(&view);
    if (result == NULL && !PyErr_Occurred()) Py_RETURN_NONE;
    return result;
}

static PyMethodDef methods[] = {
    {"split", split, METH_VARARGS,
     "split(body, min_chars, marker, chunk_chars=65536) -> (rest, values, spans) | None\n\n"
     "The number arrays of at least min_chars characters in a JSON body, outside strings,\n"
     "parsed in chunks of about chunk_chars on up to one thread per usable CPU (at most 8):\n"
     "rest is the body with each such array replaced by the string marker + its index,\n"
     "values holds each array's numbers as float64 bytes, spans each array's (start, end)\n"
     "offsets in body. None when the body has no such array, or one of them is not a flat\n"
     "list of JSON numbers within the range of a double."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jsonfloats", "Large JSON number arrays read on several cores.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__jsonfloats(void) {
    c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0);
    if (c_locale == (locale_t)0) return PyErr_NoMemory();
    if (pthread_key_create(&scratch_key, free_scratch) != 0) return PyErr_NoMemory();
    return PyModule_Create(&module);
}
