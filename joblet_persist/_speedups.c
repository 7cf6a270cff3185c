/*
 * joblet_persist._speedups: the IPC receive path's frame decoder, in C.
 *
 * decode_log_frames(data, offset, max_length, arrivals) -> (new_offset, groups, stop_reason)
 *
 * Walks [u32 big-endian length][IPCMessage] frames of `data` from `offset` and collects every
 * canonical LOG frame into `groups`, {(job_uuid, stream): [timestamps, sequences, arrivals,
 * contents]}, stopping at the first frame that needs the general decoder ("slow"), at an
 * incomplete frame ("partial") or at the end of the data ("end").  The semantics, and the
 * exact protobuf wire-format rules followed, are documented in joblet_persist/framing.py,
 * whose pure-Python implementation this module must match exactly (tests/test_framing.py
 * checks both against each other and against the generated protobuf classes).
 *
 * Runs on the calling thread (the reactor thread) and holds the GIL throughout: it creates
 * Python objects for every accepted frame.
 *
 * plan_members(...) splits a batch into storage members and builds their tables and data for
 * storage/format.py (the write path, on pool threads, mostly without the GIL; links zlib for
 * the tables), and decode_table(...) decodes canonically encoded tables (the query path);
 * each has a pure-Python reference in storage/format.py that tests/test_member_table.py
 * holds it to.
 *
 * append_at(path, blobs, expected_size, fsync) appends a batch's members to an existing
 * segment file in one stretch without the GIL (storage/segment.py, pool threads).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <zlib.h>

/* Conversions of an int to 64 bits.  In CPython 3.11, PyLong_AsLongLong and
 * PyLong_AsUnsignedLongLong take a generic byte-by-byte path for any int of more than one
 * 30-bit digit (every nanosecond timestamp), while PyLong_AsLong and PyLong_AsUnsignedLong
 * loop over the digits: the same results and errors where long has 64 bits. */
#if LONG_MAX == INT64_MAX
#define as_i64(o) ((long long)PyLong_AsLong(o))
#define as_u64(o) ((unsigned long long)PyLong_AsUnsignedLong(o))
#else
#define as_i64(o) PyLong_AsLongLong(o)
#define as_u64(o) PyLong_AsUnsignedLongLong(o)
#endif

static PyObject *str_slow;
static PyObject *str_partial;
static PyObject *str_end;
static PyObject *stream_numbers[3];
static PyObject *type_keys[10]; /* -2 .. -9: the group keys of metric and event frames */
static uint64_t hash_seed;

/* -- wire format ---------------------------------------------------------------------------- */

/* A varint of at most `max_bytes` bytes; the value is taken modulo 2**64 (a 10th byte only
 * contributes its lowest bit), as upb does.  0 when truncated or too long. */
static inline int
read_varint(const unsigned char **pp, const unsigned char *end, int max_bytes, uint64_t *out)
{
    const unsigned char *p = *pp;
    uint64_t value = 0;
    int i;
    for (i = 0; i < max_bytes; i++) {
        unsigned char byte;
        if (p >= end) {
            return 0;
        }
        byte = *p++;
        value |= (uint64_t)(byte & 0x7f) << (7 * i);
        if (!(byte & 0x80)) {
            *pp = p;
            *out = value;
            return 1;
        }
    }
    return 0;
}

/* A field tag: at most 5 bytes and at most 2**32 - 1; field number 0 is malformed. */
static inline int
read_tag(const unsigned char **pp, const unsigned char *end, uint32_t *field, uint32_t *wire)
{
    uint64_t tag;
    const unsigned char *p = *pp;
    if (p < end && *p < 0x80) {
        tag = *p;
        *pp = p + 1;
    }
    else if (!read_varint(pp, end, 5, &tag) || tag > UINT32_MAX) {
        return 0;
    }
    *field = (uint32_t)(tag >> 3);
    *wire = (uint32_t)(tag & 7);
    return *field != 0;
}

/* The size of a length-delimited field: a varint of at most 5 bytes, below 2**31 - 1, that
 * fits in what is left of the message. */
static inline int
read_size(const unsigned char **pp, const unsigned char *end, Py_ssize_t *size)
{
    uint64_t value;
    if (!read_varint(pp, end, 5, &value) || value >= 0x7fffffffu
        || value > (uint64_t)(end - *pp)) {
        return 0;
    }
    *size = (Py_ssize_t)value;
    return 1;
}

/* Skip an unknown field.  Groups (wire types 3 and 4) and wire types 6 and 7 are refused. */
static inline int
skip_field(const unsigned char **pp, const unsigned char *end, uint32_t wire)
{
    uint64_t ignored;
    Py_ssize_t size;
    switch (wire) {
    case 0:
        return read_varint(pp, end, 10, &ignored);
    case 1:
        if (end - *pp < 8) {
            return 0;
        }
        *pp += 8;
        return 1;
    case 2:
        if (!read_size(pp, end, &size)) {
            return 0;
        }
        *pp += size;
        return 1;
    case 5:
        if (end - *pp < 4) {
            return 0;
        }
        *pp += 4;
        return 1;
    default:
        return 0;
    }
}

/* Strict UTF-8 (no surrogates, no overlong forms, nothing above U+10FFFF), as protobuf
 * requires for string fields. */
static int
utf8_valid(const unsigned char *s, Py_ssize_t n)
{
    const unsigned char *end = s + n;
    while (s < end) {
        unsigned char c = *s;
        if (end - s >= 8) {
            uint64_t word;
            memcpy(&word, s, 8);
            if (!(word & UINT64_C(0x8080808080808080))) {
                s += 8;
                continue;
            }
        }
        if (c < 0x80) {
            s++;
        }
        else if (c < 0xc2) {
            return 0;
        }
        else if (c < 0xe0) {
            if (end - s < 2 || (s[1] & 0xc0) != 0x80) {
                return 0;
            }
            s += 2;
        }
        else if (c < 0xf0) {
            if (end - s < 3 || (s[1] & 0xc0) != 0x80 || (s[2] & 0xc0) != 0x80
                || (c == 0xe0 && s[1] < 0xa0) || (c == 0xed && s[1] >= 0xa0)) {
                return 0;
            }
            s += 3;
        }
        else if (c < 0xf5) {
            if (end - s < 4 || (s[1] & 0xc0) != 0x80 || (s[2] & 0xc0) != 0x80
                || (s[3] & 0xc0) != 0x80 || (c == 0xf0 && s[1] < 0x90)
                || (c == 0xf4 && s[1] >= 0x90)) {
                return 0;
            }
            s += 4;
        }
        else {
            return 0;
        }
    }
    return 1;
}

typedef struct {
    const unsigned char *job;
    Py_ssize_t job_len;
    int stream;
    int64_t timestamp;
    uint64_t sequence;
    const unsigned char *content;
    Py_ssize_t content_len;
} LogFrame;

/* LogLine: 1 job_uuid string (checked, ignored), 2 stream enum, 3 timestamp int64,
 * 4 sequence uint64, 5 content bytes.  Scalars: the last occurrence wins. */
static int
parse_log_line(const unsigned char *p, const unsigned char *end, LogFrame *f)
{
    uint32_t stream = 0;
    uint64_t value;
    Py_ssize_t size;
    f->timestamp = 0;
    f->sequence = 0;
    f->content = p;
    f->content_len = 0;
    while (p < end) {
        uint32_t field, wire;
        if (!read_tag(&p, end, &field, &wire)) {
            return 0;
        }
        switch (field) {
        case 1:
            if (wire != 2 || !read_size(&p, end, &size) || !utf8_valid(p, size)) {
                return 0;
            }
            p += size;
            break;
        case 2:
            if (wire != 0 || !read_varint(&p, end, 10, &value)) {
                return 0;
            }
            stream = (uint32_t)value;
            break;
        case 3:
            if (wire != 0 || !read_varint(&p, end, 10, &value)) {
                return 0;
            }
            f->timestamp = (int64_t)value;
            break;
        case 4:
            if (wire != 0 || !read_varint(&p, end, 10, &f->sequence)) {
                return 0;
            }
            break;
        case 5:
            if (wire != 2 || !read_size(&p, end, &size)) {
                return 0;
            }
            f->content = p;
            f->content_len = size;
            p += size;
            break;
        default:
            if (!skip_field(&p, end, wire)) {
                return 0;
            }
        }
    }
    if (stream != 1 && stream != 2) {
        return 0;
    }
    f->stream = (int)stream;
    return 1;
}

/* The envelope's fields, as parse_envelope reads them. */
typedef struct {
    uint32_t type; /* the enum's low 32 bits */
    int64_t timestamp;
    uint64_t sequence;
    const unsigned char *data, *data_end;
} Envelope;

/* IPCMessage: 1 version uint32, 2 type enum, 3 job_uuid string, 4 timestamp int64,
 * 5 sequence uint64, 6 data bytes (a second occurrence is refused).  Fills f->job/job_len
 * and `env`; 0 when the envelope is not canonical. */
static int
parse_envelope(const unsigned char *p, const unsigned char *end, LogFrame *f, Envelope *env)
{
    uint32_t type = 0;
    const unsigned char *data = p, *data_end = p;
    int have_data = 0;
    uint64_t value;
    Py_ssize_t size;
    f->job = p;
    f->job_len = 0;
    env->timestamp = 0;
    env->sequence = 0;
    while (p < end) {
        uint32_t field, wire;
        if (!read_tag(&p, end, &field, &wire)) {
            return 0;
        }
        switch (field) {
        case 1:
            if (wire != 0 || !read_varint(&p, end, 10, &value)) {
                return 0;
            }
            break;
        case 4:
            if (wire != 0 || !read_varint(&p, end, 10, &value)) {
                return 0;
            }
            env->timestamp = (int64_t)value;
            break;
        case 5:
            if (wire != 0 || !read_varint(&p, end, 10, &env->sequence)) {
                return 0;
            }
            break;
        case 2:
            if (wire != 0 || !read_varint(&p, end, 10, &value)) {
                return 0;
            }
            type = (uint32_t)value;
            break;
        case 3:
            if (wire != 2 || !read_size(&p, end, &size) || !utf8_valid(p, size)) {
                return 0;
            }
            f->job = p;
            f->job_len = size;
            p += size;
            break;
        case 6:
            if (wire != 2 || have_data || !read_size(&p, end, &size)) {
                return 0;
            }
            have_data = 1;
            data = p;
            data_end = p + size;
            p += size;
            break;
        default:
            if (!skip_field(&p, end, wire)) {
                return 0;
            }
        }
    }
    env->type = type;
    env->data = data;
    env->data_end = data_end;
    return 1;
}

/* 1: a canonical LOG frame, `f` filled.  2: a canonical envelope of another type than LOG,
 * `env` (and f->job) filled.  0: anything else. */
static int
parse_frame(const unsigned char *p, const unsigned char *end, LogFrame *f, Envelope *env)
{
    if (!parse_envelope(p, end, f, env)) {
        return 0;
    }
    if (env->type != 1) {
        return 2;
    }
    return parse_log_line(env->data, env->data_end, f);
}


/* -- per-call job table ------------------------------------------------------------------ */

/* The (timestamp, sequence, arrival) of each grouped metric or event frame of one
 * (job, type) in a call, as int64 triples (a sequence's bits as they are). */
struct triples {
    int64_t *v;
    Py_ssize_t n, room;
};

/* One job seen during a call: its interned id, its group columns per stream (borrowed from the
 * groups dict) and its next arrival number. */
typedef struct {
    uint64_t hash;
    const unsigned char *raw; /* the id's bytes inside `data` */
    Py_ssize_t len;
    PyObject *job; /* owned; NULL marks a free slot */
    PyObject *columns[2][4];
    /* Grouped mode, per message type 2..9 (index type - 2): the group (its list of four
     * columns, borrowed from the groups dict; item 3 the payloads), and its frames'
     * (timestamp, sequence, arrival) triples (NULL until the job's first grouped frame),
     * which become its three packed int columns at the end of the call. */
    PyObject *other_group[8];
    struct triples *triples;
    /* The last timestamp appended per stream (borrowed from its list): joblet-core sends
     * whole seconds, so consecutive lines often share one int object. */
    PyObject *last_timestamp[2];
    int64_t last_timestamp_value[2];
    long long next_arrival;
} Entry;

typedef struct {
    Entry *slots;
    size_t mask;
    size_t used;
    Entry inline_slots[16];
} JobTable;

static uint64_t
hash_bytes(const unsigned char *p, Py_ssize_t n)
{
    uint64_t h = hash_seed ^ ((uint64_t)n * UINT64_C(0x9e3779b97f4a7c15));
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        h = (h ^ word) * UINT64_C(0xff51afd7ed558ccd);
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    if (n > 0) {
        uint64_t word = 0;
        memcpy(&word, p, (size_t)n);
        h = (h ^ word) * UINT64_C(0xc4ceb9fe1a85ec53);
    }
    h ^= h >> 32;
    return h;
}

static void
table_init(JobTable *t)
{
    memset(t->inline_slots, 0, sizeof(t->inline_slots));
    t->slots = t->inline_slots;
    t->mask = 15;
    t->used = 0;
}

static void
table_free(JobTable *t)
{
    size_t i;
    int k;
    for (i = 0; i <= t->mask; i++) {
        Py_XDECREF(t->slots[i].job);
        if (t->slots[i].triples != NULL) {
            for (k = 0; k < 8; k++) {
                PyMem_Free(t->slots[i].triples[k].v);
            }
            PyMem_Free(t->slots[i].triples);
        }
    }
    if (t->slots != t->inline_slots) {
        PyMem_Free(t->slots);
    }
}

static Entry *
table_probe(Entry *slots, size_t mask, uint64_t hash, const unsigned char *raw, Py_ssize_t len)
{
    size_t i = (size_t)hash & mask;
    for (;;) {
        Entry *e = &slots[i];
        if (e->job == NULL
            || (e->hash == hash && e->len == len && memcmp(e->raw, raw, (size_t)len) == 0)) {
            return e;
        }
        i = (i + 1) & mask;
    }
}

static int
table_grow(JobTable *t)
{
    size_t new_mask = t->mask * 2 + 1, i;
    Entry *slots = PyMem_Calloc(new_mask + 1, sizeof(Entry));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i <= t->mask; i++) {
        Entry *old = &t->slots[i];
        if (old->job != NULL) {
            *table_probe(slots, new_mask, old->hash, old->raw, old->len) = *old;
        }
    }
    if (t->slots != t->inline_slots) {
        PyMem_Free(t->slots);
    }
    t->slots = slots;
    t->mask = new_mask;
    return 0;
}

/* The int at dict[key] in *value (left as it is when the key is absent): 0, or -1 with an
 * exception set. */
static int
dict_get_longlong(PyObject *dict, PyObject *key, long long *value)
{
    PyObject *item = PyDict_GetItemWithError(dict, key); /* borrowed */
    long long v;
    if (item == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    v = as_i64(item);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    *value = v;
    return 0;
}

/* The entry of the job whose (valid UTF-8) id is raw[:len], created on first sight with the
 * arrival number read from `arrivals`.  NULL with an exception set on error. */
static Entry *
table_get(JobTable *t, const unsigned char *raw, Py_ssize_t len, PyObject *arrivals)
{
    uint64_t hash = hash_bytes(raw, len);
    Entry *e = table_probe(t->slots, t->mask, hash, raw, len);
    PyObject *job;
    long long next_arrival = 0;
    if (e->job != NULL) {
        return e;
    }
    job = PyUnicode_DecodeUTF8((const char *)raw, len, "strict");
    if (job == NULL) {
        return NULL;
    }
    if (dict_get_longlong(arrivals, job, &next_arrival) < 0) {
        Py_DECREF(job);
        return NULL;
    }
    if ((t->used + 1) * 2 > t->mask + 1) {
        if (table_grow(t) < 0) {
            Py_DECREF(job);
            return NULL;
        }
        e = table_probe(t->slots, t->mask, hash, raw, len);
    }
    memset(e, 0, sizeof(*e));
    e->hash = hash;
    e->raw = raw;
    e->len = len;
    e->job = job;
    e->next_arrival = next_arrival;
    t->used++;
    return e;
}

/* Store every seen job's next arrival number into `arrivals`. */
static int
table_store_arrivals(JobTable *t, PyObject *arrivals)
{
    size_t i;
    for (i = 0; i <= t->mask; i++) {
        Entry *e = &t->slots[i];
        PyObject *value;
        int rc;
        if (e->job == NULL) {
            continue;
        }
        value = PyLong_FromLongLong(e->next_arrival);
        if (value == NULL) {
            return -1;
        }
        rc = PyDict_SetItem(arrivals, e->job, value);
        Py_DECREF(value);
        if (rc < 0) {
            return -1;
        }
    }
    return 0;
}

/* A new empty column list that the cyclic garbage collector does not track: columns only
 * ever hold bytes and ints, which cannot be part of a reference cycle. */
static PyObject *
new_column(void)
{
    PyObject *column = PyList_New(0);
    if (column != NULL) {
        PyObject_GC_UnTrack(column);
    }
    return column;
}

/* groups[(job, tag)] = value, stealing the reference to `value`: 0, or -1 with an
 * exception set. */
static int
set_group(PyObject *groups, PyObject *job, PyObject *tag, PyObject *value)
{
    PyObject *key = PyTuple_Pack(2, job, tag);
    int rc;
    if (key == NULL) {
        Py_DECREF(value);
        return -1;
    }
    rc = PyDict_SetItem(groups, key, value);
    Py_DECREF(key);
    Py_DECREF(value);
    return rc;
}

/* Create the group (job, tag) in `groups`, a list of four new columns (new_column) whose
 * borrowed references go to `columns`. */
static int
new_columns_group(PyObject *groups, PyObject *job, PyObject *tag, PyObject **columns)
{
    PyObject *value;
    int i;
    value = PyList_New(4);
    if (value == NULL) {
        return -1;
    }
    for (i = 0; i < 4; i++) {
        PyObject *column = new_column();
        if (column == NULL) {
            Py_DECREF(value);
            return -1;
        }
        PyList_SET_ITEM(value, i, column);
        columns[i] = column;
    }
    return set_group(groups, job, tag, value);
}

/* Create the (job, stream) group in `groups`; keep borrowed references to its four lists. */
static int
new_group(PyObject *groups, Entry *e, int stream)
{
    return new_columns_group(groups, e->job, stream_numbers[stream], e->columns[stream - 1]);
}

static inline int
append_new(PyObject *list, PyObject *item)
{
    int rc;
    if (item == NULL) {
        return -1;
    }
    rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* Append (type, job_uuid, timestamp, sequence, data, length, arrival) of a frame of another
 * type than LOG to `others`; `job` is the interned id (new reference stolen), `arrival` None
 * or an int (stolen). */
static int
append_other(PyObject *others, PyObject *job, const Envelope *env, uint32_t length,
             PyObject *arrival)
{
    PyObject *item = Py_BuildValue(
        "(iNLKy#IN)", (int)(int32_t)env->type, job,
        (long long)env->timestamp, (unsigned long long)env->sequence,
        (const char *)env->data, (Py_ssize_t)(env->data_end - env->data), (unsigned int)length,
        arrival);
    return append_new(others, item);
}

/* -- decode_log_frames ----------------------------------------------------------------------- */

/* Grouped mode: the record time of a metric or event frame (type 2..9) whose payload is
 * canonical (1), or 0 (not canonical), or -1 (error set).  Defined with the payload parsers
 * below. */
static int other_payload_time(uint32_t type, const Envelope *env, int64_t *ts, uint64_t *seq);

/* Create the (job, -type) group of a metric or event frame in `groups`: a list of four
 * columns, the payloads' a new column (new_column) and the int columns None until
 * finish_packed_groups sets them. */
static int
new_other_group(PyObject *groups, Entry *e, uint32_t type)
{
    PyObject *value, *items;
    int i, rc;
    if (e->triples == NULL) {
        e->triples = PyMem_Calloc(8, sizeof(struct triples));
        if (e->triples == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    value = PyList_New(4);
    if (value == NULL) {
        return -1;
    }
    for (i = 0; i < 3; i++) {
        Py_INCREF(Py_None);
        PyList_SET_ITEM(value, i, Py_None);
    }
    items = new_column();
    if (items == NULL) {
        Py_DECREF(value);
        return -1;
    }
    PyList_SET_ITEM(value, 3, items);
    rc = set_group(groups, e->job, type_keys[type], value);
    if (rc == 0) { /* the dict holds the group */
        e->other_group[type - 2] = value;
    }
    return rc;
}

static inline int
triples_add(struct triples *t, int64_t a, int64_t b, int64_t c)
{
    int64_t *v;
    if (t->n == t->room) {
        Py_ssize_t room = t->room ? t->room * 2 : 64;
        v = PyMem_Realloc(t->v, (size_t)room * 3 * sizeof(int64_t));
        if (v == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        t->v = v;
        t->room = room;
    }
    v = t->v + 3 * t->n++;
    v[0] = a;
    v[1] = b;
    v[2] = c;
    return 0;
}

/* array('q', [0]) and array('Q', [0]): `one * n` is a new packed column of n items, made
 * in one C call, whose buffer is then filled. */
static PyObject *packed_one_signed, *packed_one_unsigned;

/* A new packed column like `one` (packed_one_*) holding the n >= 1 values v[k], v[k + 3],
 * ... */
static PyObject *
packed_from_triples(PyObject *one, const int64_t *v, Py_ssize_t n, int k)
{
    PyObject *column = PySequence_Repeat(one, n);
    Py_buffer view;
    int64_t *out;
    Py_ssize_t i;
    if (column == NULL) {
        return NULL;
    }
    if (PyObject_GetBuffer(column, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(column);
        return NULL;
    }
    if (view.len != n * (Py_ssize_t)sizeof(int64_t)) {
        PyBuffer_Release(&view);
        Py_DECREF(column);
        PyErr_SetString(PyExc_SystemError, "packed column of an unexpected size");
        return NULL;
    }
    out = view.buf;
    for (i = 0; i < n; i++) {
        out[i] = v[3 * i + k];
    }
    PyBuffer_Release(&view);
    return column;
}

/* Give every metric and event group of the call its packed int columns: timestamps and
 * arrivals array('q'), sequences array('Q'). */
static int
finish_packed_groups(JobTable *t)
{
    size_t i;
    int type, k;
    for (i = 0; i <= t->mask; i++) {
        Entry *e = &t->slots[i];
        if (e->job == NULL || e->triples == NULL) {
            continue;
        }
        for (type = 0; type < 8; type++) {
            struct triples *tr = &e->triples[type];
            if (e->other_group[type] == NULL) {
                continue;
            }
            for (k = 0; k < 3; k++) {
                PyObject *column = packed_from_triples(
                    k == 1 ? packed_one_unsigned : packed_one_signed, tr->v, tr->n, k);
                if (column == NULL) {
                    return -1;
                }
                PyList_SetItem(e->other_group[type], k, column); /* steals; frees None's ref */
            }
        }
    }
    return 0;
}

PyDoc_STRVAR(decode_log_frames_doc,
"decode_log_frames(data, offset, max_length, arrivals, others=None, grouped=False)\n\
    -> (new_offset, groups, stop_reason)\n\
\n\
Collect the canonical LOG frames of data[offset:] into groups keyed by (job_uuid, stream);\n\
with a list `others`, append the other frames whose envelope is canonical to it and go on;\n\
with `grouped` true as well, group the canonical metric and event frames by (job_uuid, -type);\n\
see joblet_persist.framing for the exact contract.");

static PyObject *
decode_log_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *data, *arrivals, *others = NULL, *groups, *reason, *result;
    Py_ssize_t offset, end, pos;
    long long max_length;
    int overflow;
    const unsigned char *base;
    JobTable table;
    int grouped = 0;

    (void)module;
    if (nargs < 4 || nargs > 6) {
        PyErr_Format(PyExc_TypeError,
                     "decode_log_frames() takes 4 to 6 arguments (%zd given)", nargs);
        return NULL;
    }
    data = args[0];
    arrivals = args[3];
    if (nargs >= 5 && args[4] != Py_None) {
        others = args[4];
        if (!PyList_Check(others)) {
            PyErr_Format(PyExc_TypeError, "others must be a list or None, not %.100s",
                         Py_TYPE(others)->tp_name);
            return NULL;
        }
    }
    if (nargs == 6) {
        grouped = PyObject_IsTrue(args[5]);
        if (grouped < 0) {
            return NULL;
        }
        if (grouped && others == NULL) {
            PyErr_SetString(PyExc_ValueError, "grouped needs an others list");
            return NULL;
        }
    }
    if (!PyBytes_Check(data)) {
        PyErr_Format(PyExc_TypeError, "data must be bytes, not %.100s", Py_TYPE(data)->tp_name);
        return NULL;
    }
    if (!PyDict_Check(arrivals)) {
        PyErr_Format(PyExc_TypeError, "arrivals must be a dict, not %.100s",
                     Py_TYPE(arrivals)->tp_name);
        return NULL;
    }
    offset = PyNumber_AsSsize_t(args[1], NULL); /* clamped: out of range below */
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    max_length = PyLong_AsLongLongAndOverflow(args[2], &overflow);
    if (max_length == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow) {
        max_length = overflow > 0 ? LLONG_MAX : LLONG_MIN;
    }
    end = PyBytes_GET_SIZE(data);
    if (offset < 0 || offset > end) {
        PyErr_Format(PyExc_ValueError, "offset %zd outside the data (0..%zd)", offset, end);
        return NULL;
    }
    base = (const unsigned char *)PyBytes_AS_STRING(data);

    groups = PyDict_New();
    if (groups == NULL) {
        return NULL;
    }
    table_init(&table);
    pos = offset;
    for (;;) {
        const unsigned char *frame;
        uint32_t length;
        LogFrame f;
        Envelope env;
        int kind;
        Entry *e;
        PyObject **columns, *last;

        if (end - pos < 4) {
            reason = pos == end ? str_end : str_partial;
            break;
        }
        frame = base + pos;
        length = ((uint32_t)frame[0] << 24) | ((uint32_t)frame[1] << 16)
                 | ((uint32_t)frame[2] << 8) | (uint32_t)frame[3];
        if ((long long)length > max_length) {
            reason = str_slow;
            break;
        }
        if ((Py_ssize_t)length > end - pos - 4) {
            reason = str_partial;
            break;
        }
        kind = parse_frame(frame + 4, frame + 4 + length, &f, &env);
        if (kind != 1) {
            if (kind == 0 || others == NULL) {
                reason = str_slow;
                break;
            }
            if (env.type >= 2 && env.type <= 9) {
                /* A metric or event frame: its arrival number from the job's counter. */
                e = table_get(&table, f.job, f.job_len, arrivals);
                if (e == NULL) {
                    goto error;
                }
                if (e->next_arrival == LLONG_MAX) {
                    PyErr_Format(PyExc_OverflowError, "arrival number of job %R out of range",
                                 e->job);
                    goto error;
                }
                if (grouped) {
                    int64_t ts;
                    uint64_t seq;
                    int ok = other_payload_time(env.type, &env, &ts, &seq);
                    if (ok < 0) {
                        goto error;
                    }
                    if (ok) {
                        if (e->other_group[env.type - 2] == NULL
                            && new_other_group(groups, e, env.type) < 0) {
                            goto error;
                        }
                        if (triples_add(&e->triples[env.type - 2], ts, (int64_t)seq,
                                        e->next_arrival) < 0
                            || append_new(PyList_GET_ITEM(e->other_group[env.type - 2], 3),
                                          PyBytes_FromStringAndSize(
                                              (const char *)env.data,
                                              env.data_end - env.data)) < 0) {
                            goto error;
                        }
                        e->next_arrival++;
                        pos += 4 + (Py_ssize_t)length;
                        continue;
                    }
                    if (e->other_group[env.type - 2] != NULL) {
                        /* After grouped frames of its (job, type): the caller's general
                         * decoder takes it once the groups are delivered, keeping their order. */
                        reason = str_slow;
                        break;
                    }
                }
                Py_INCREF(e->job);
                if (append_other(others, e->job, &env, length,
                                 PyLong_FromLongLong(e->next_arrival)) < 0) {
                    goto error;
                }
                e->next_arrival++;
            }
            else {
                Py_INCREF(Py_None);
                if (append_other(others,
                                 PyUnicode_DecodeUTF8((const char *)f.job, f.job_len, "strict"),
                                 &env, length, Py_None) < 0) {
                    goto error;
                }
            }
            pos += 4 + (Py_ssize_t)length;
            continue;
        }
        e = table_get(&table, f.job, f.job_len, arrivals);
        if (e == NULL) {
            goto error;
        }
        if (e->next_arrival == LLONG_MAX) {
            PyErr_Format(PyExc_OverflowError, "arrival number of job %R out of range", e->job);
            goto error;
        }
        columns = e->columns[f.stream - 1];
        if (columns[0] == NULL && new_group(groups, e, f.stream) < 0) {
            goto error;
        }
        last = e->last_timestamp[f.stream - 1];
        if (last != NULL && e->last_timestamp_value[f.stream - 1] == f.timestamp) {
            if (PyList_Append(columns[0], last) < 0) {
                goto error;
            }
        }
        else {
            last = PyLong_FromLongLong(f.timestamp);
            if (append_new(columns[0], last) < 0) {
                goto error;
            }
            e->last_timestamp[f.stream - 1] = last;
            e->last_timestamp_value[f.stream - 1] = f.timestamp;
        }
        if (append_new(columns[1], PyLong_FromUnsignedLongLong(f.sequence)) < 0
            || append_new(columns[2], PyLong_FromLongLong(e->next_arrival)) < 0
            || append_new(columns[3], PyBytes_FromStringAndSize((const char *)f.content,
                                                                f.content_len)) < 0) {
            goto error;
        }
        e->next_arrival++;
        pos += 4 + (Py_ssize_t)length;
    }
    if (finish_packed_groups(&table) < 0 || table_store_arrivals(&table, arrivals) < 0) {
        goto error;
    }
    table_free(&table);
    result = Py_BuildValue("(nNO)", pos, groups, reason);
    return result;

error:
    table_free(&table);
    Py_DECREF(groups);
    return NULL;
}

/* -- packed int columns ------------------------------------------------------------------
 *
 * The int columns of metric and event groups and batches (timestamps, sequences,
 * arrivals) are array.array('q') / array('Q') rather than lists of ints: one buffer each,
 * with no object per value to allocate, read and free.  The functions below that take int
 * columns take either form. */

/* Whether `format` (a buffer's) is an 8-byte int, unsigned as asked. */
static int
int64_format(const char *format, int is_unsigned)
{
    if (format == NULL) {
        return 0;
    }
    if (strcmp(format, is_unsigned ? "Q" : "q") == 0) {
        return 1;
    }
    return sizeof(long) == 8 && strcmp(format, is_unsigned ? "L" : "l") == 0;
}

/* A packed int column of n items: an object other than a list or tuple whose C-contiguous
 * buffer holds 8-byte ints, unsigned as asked.  1: its items copied to out; 0: not such a
 * column (no error set); -1: error. */
static int
read_packed(PyObject *column, Py_ssize_t n, int is_unsigned, void *out)
{
    Py_buffer view;
    int ok;
    if (PyList_Check(column) || PyTuple_Check(column) || !PyObject_CheckBuffer(column)) {
        return 0;
    }
    if (PyObject_GetBuffer(column, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        return 0;
    }
    ok = view.itemsize == 8 && int64_format(view.format, is_unsigned)
         && view.len == n * (Py_ssize_t)sizeof(int64_t);
    if (ok && n > 0) {
        memcpy(out, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return ok;
}

/* An int column of n items for a C array: 1, a packed column (read_packed) copied to out;
 * 0, a list, whose items the caller reads; -2, anything else (no error set); -1, error. */
static int
take_int_column(PyObject *column, Py_ssize_t n, int is_unsigned, void *out)
{
    int packed = read_packed(column, n, is_unsigned, out);
    if (packed == 0 && !PyList_Check(column)) {
        return -2;
    }
    return packed;
}

/* The number of items of an int column (a list, or anything with a length), or -1 with an
 * exception set. */
static Py_ssize_t
column_size(PyObject *column)
{
    return PyList_Check(column) ? PyList_GET_SIZE(column) : PyObject_Length(column);
}

/* Item k of a list of ints as an int64 in *out: 1, or 0 (not an int, or out of range; no
 * error set). */
static inline int
list_item_i64(PyObject *list, Py_ssize_t k, int64_t *out)
{
    PyObject *item = PyList_GET_ITEM(list, k);
    long long value;
    if (!PyLong_Check(item)) {
        return 0;
    }
    value = as_i64(item);
    if (value == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = value;
    return 1;
}

/* ---- plan_members: the members of a storage batch (storage/format.py) -------------------- */

typedef struct {
    unsigned char *buf;
    Py_ssize_t len;
} column_t;

static inline void
column_put_varint(column_t *c, uint64_t v)
{
    while (v >= 0x80) {
        c->buf[c->len++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    c->buf[c->len++] = (unsigned char)v;
}

static inline uint64_t
zigzag64(int64_t v)
{
    return ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
}

static Py_ssize_t
varint_size(uint64_t v)
{
    Py_ssize_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* JP header constants of storage/format.py (FLAG_TABLE_DEFLATED, FLAG_LINES,
 * _TABLE_DEFLATE_MIN); tests/test_member_table.py checks plan_members against the Python
 * planner, which uses the module's own constants. */
#define JP_FLAG_TABLE_DEFLATED 1
#define JP_FLAG_LINES 2
#define JP_TABLE_DEFLATE_MIN 64

/* plan_members releases the GIL for a batch of at least this many bytes or messages. */
#define JP_RELEASE_BYTES (64 * 1024)
#define JP_RELEASE_ITEMS 256

/* metric_json_lines and event_json_lines release it for a batch of at least this many. */
#define JP_RELEASE_LINES 256

/* One planned member: messages [start, end) of the batch. */
typedef struct {
    Py_ssize_t start, end;
    unsigned char *stored; /* the stored table (raw or deflated), PyMem_Raw */
    Py_ssize_t stored_len, raw_len;
    int flags;
    int64_t min_ts, max_ts;
    unsigned long crc; /* CRC-32 of the member's data */
} planned_t;

/* The plan's working state; everything here is plain C memory (PyMem_Raw*), so that the
 * planning runs without the GIL. */
typedef struct {
    Py_ssize_t n;
    const char **ptr;    /* the items' bytes (the snapshot tuple keeps them alive) */
    Py_ssize_t *len;
    Py_ssize_t *cum;     /* cum[k]: bytes of items [0, k) */
    Py_ssize_t *nonline; /* nonline[k]: items of [0, k) that are not a line */
    int64_t *ts;
    uint64_t *seq;
    int64_t *ord;
    column_t cols[4];    /* scratch: the four packed columns of one table */
    unsigned char *raw;  /* scratch: one serialized table */
    Py_ssize_t raw_room;
    unsigned char *packed; /* scratch: one deflated table */
    Py_ssize_t packed_room;
    z_stream zs;
    int zs_ready;
    planned_t *members;
    Py_ssize_t nmembers, members_room;
} plan_t;

static void
plan_free(plan_t *p)
{
    Py_ssize_t k;
    PyMem_RawFree((void *)p->ptr);
    PyMem_RawFree(p->len);
    PyMem_RawFree(p->cum);
    PyMem_RawFree(p->nonline);
    PyMem_RawFree(p->ts);
    PyMem_RawFree(p->seq);
    PyMem_RawFree(p->ord);
    for (k = 0; k < 4; k++) {
        PyMem_RawFree(p->cols[k].buf);
    }
    PyMem_RawFree(p->raw);
    PyMem_RawFree(p->packed);
    if (p->zs_ready) {
        deflateEnd(&p->zs);
    }
    if (p->members != NULL) {
        for (k = 0; k < p->nmembers; k++) {
            PyMem_RawFree(p->members[k].stored);
        }
        PyMem_RawFree(p->members);
    }
}

/* Serialize the table of messages [i, j) into p->raw (format.py's _build_table: packed
 * lengths unless `lines`, zigzag timestamp deltas from the window minimum then from the
 * previous message, zigzag sequence deltas, ordinal deltas; deltas wrap modulo 2**64).
 * Returns the raw length, -1 when out of memory.  No GIL needed. */
static Py_ssize_t
plan_raw_table(plan_t *p, Py_ssize_t i, Py_ssize_t j, int lines, int64_t *min_out,
               int64_t *max_out)
{
    Py_ssize_t k, total = 0, first = lines ? 1 : 0;
    int64_t min_ts = p->ts[i], max_ts = p->ts[i];
    unsigned char *out;
    for (k = 0; k < 4; k++) {
        p->cols[k].len = 0;
    }
    for (k = i + 1; k < j; k++) {
        if (p->ts[k] < min_ts) {
            min_ts = p->ts[k];
        }
        if (p->ts[k] > max_ts) {
            max_ts = p->ts[k];
        }
    }
    if (!lines) {
        for (k = i; k < j; k++) {
            column_put_varint(&p->cols[0], (uint64_t)p->len[k]);
        }
    }
    column_put_varint(&p->cols[1], zigzag64((int64_t)((uint64_t)p->ts[i] - (uint64_t)min_ts)));
    column_put_varint(&p->cols[2], 0);
    column_put_varint(&p->cols[3], 0);
    for (k = i + 1; k < j; k++) {
        column_put_varint(&p->cols[1],
                          zigzag64((int64_t)((uint64_t)p->ts[k] - (uint64_t)p->ts[k - 1])));
        column_put_varint(&p->cols[2], zigzag64((int64_t)(p->seq[k] - p->seq[k - 1])));
        column_put_varint(&p->cols[3], (uint64_t)p->ord[k] - (uint64_t)p->ord[k - 1]);
    }
    for (k = first; k < 4; k++) {
        total += 1 + varint_size((uint64_t)p->cols[k].len) + p->cols[k].len;
    }
    if (total > p->raw_room) {
        unsigned char *grown = PyMem_RawRealloc(p->raw, (size_t)total);
        if (grown == NULL) {
            return -1;
        }
        p->raw = grown;
        p->raw_room = total;
    }
    out = p->raw;
    for (k = first; k < 4; k++) {
        column_t header = {out, 0};
        header.buf[header.len++] = (unsigned char)(((k + 1) << 3) | 2);
        column_put_varint(&header, (uint64_t)p->cols[k].len);
        out += header.len;
        memcpy(out, p->cols[k].buf, (size_t)p->cols[k].len);
        out += p->cols[k].len;
    }
    *min_out = min_ts;
    *max_out = max_ts;
    return total;
}

/* format.py's _pack_table on p->raw[0:raw_len]: deflate it (zlib level 6, raw, as
 * zlib.compressobj(6, DEFLATED, -15).compress(raw) + .flush() does) when the table is at
 * least JP_TABLE_DEFLATE_MIN bytes and that makes it smaller.  Sets *stored / *stored_len
 * (pointing into p->raw or p->packed) and returns the flags; -1 on failure.  No GIL. */
static int
plan_pack_table(plan_t *p, Py_ssize_t raw_len, const unsigned char **stored,
                Py_ssize_t *stored_len)
{
    *stored = p->raw;
    *stored_len = raw_len;
    if (raw_len < JP_TABLE_DEFLATE_MIN) {
        return 0;
    }
    if (!p->zs_ready) {
        memset(&p->zs, 0, sizeof(p->zs));
        if (deflateInit2(&p->zs, 6, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
            return -1;
        }
        p->zs_ready = 1;
    }
    else if (deflateReset(&p->zs) != Z_OK) {
        return -1;
    }
    {
        Py_ssize_t bound = (Py_ssize_t)deflateBound(&p->zs, (uLong)raw_len) + 16;
        if (bound > p->packed_room) {
            unsigned char *grown = PyMem_RawRealloc(p->packed, (size_t)bound);
            if (grown == NULL) {
                return -1;
            }
            p->packed = grown;
            p->packed_room = bound;
        }
        p->zs.next_in = p->raw;
        p->zs.avail_in = (uInt)raw_len;
        p->zs.next_out = p->packed;
        p->zs.avail_out = (uInt)bound;
        /* The same calls as the zlib module: all input without flushing, then finish. */
        if (deflate(&p->zs, Z_NO_FLUSH) == Z_STREAM_ERROR || p->zs.avail_in != 0
            || deflate(&p->zs, Z_FINISH) != Z_STREAM_END) {
            return -1;
        }
        if ((Py_ssize_t)p->zs.total_out < raw_len) {
            *stored = p->packed;
            *stored_len = (Py_ssize_t)p->zs.total_out;
            return JP_FLAG_TABLE_DEFLATED;
        }
    }
    return 0;
}

/* Plan every member of the batch (format.py's _plan_members_py): the member boundaries
 * (max_member_raw, then the MAX_TABLE_BYTES shrink rule) and each member's stored table.
 * Returns 1 when planned, 0 when the reference path must decide (ordinals not strictly
 * increasing, a member over 4 GiB), -1 when out of memory.  No GIL. */
static int
plan_run(plan_t *p, int lines, long long max_raw, Py_ssize_t max_table)
{
    Py_ssize_t i = 0, k, n = p->n;
    for (k = 1; k < n; k++) {
        if (p->ord[k] <= p->ord[k - 1]) {
            return 0;
        }
    }
    for (k = 0; k < 4; k++) {
        /* A varint is at most 10 bytes; the whole batch bounds every window. */
        p->cols[k].buf = PyMem_RawMalloc((size_t)n * 10);
        if (p->cols[k].buf == NULL) {
            return -1;
        }
    }
    while (i < n) {
        Py_ssize_t j = i + 1, raw_len, stored_len;
        const unsigned char *stored;
        int64_t min_ts, max_ts;
        int flags, is_lines;
        planned_t *m;
        while (j < n && (long long)(p->cum[j + 1] - p->cum[i]) <= max_raw) {
            j++;
        }
        for (;;) {
            is_lines = lines && p->nonline[j] == p->nonline[i];
            raw_len = plan_raw_table(p, i, j, is_lines, &min_ts, &max_ts);
            if (raw_len < 0) {
                return -1;
            }
            flags = plan_pack_table(p, raw_len, &stored, &stored_len);
            if (flags < 0) {
                return -1;
            }
            if (stored_len <= max_table) {
                break;
            }
            {
                /* Too many messages for one header: shrink proportionally, as
                 * int((j - i) * MAX_TABLE_BYTES / len(stored) * 0.95) does. */
                double fit_d = (double)((long long)(j - i) * (long long)max_table)
                               / (double)stored_len * 0.95;
                Py_ssize_t fit = (Py_ssize_t)fit_d;
                if (fit > j - i - 1) {
                    fit = j - i - 1;
                }
                j = i + (fit > 1 ? fit : 1);
            }
        }
        if ((uint64_t)(p->cum[j] - p->cum[i]) > 0xFFFFFFFFu) {
            return 0;
        }
        if (p->nmembers == p->members_room) {
            Py_ssize_t room = p->members_room ? p->members_room * 2 : 8;
            planned_t *grown = PyMem_RawRealloc(p->members, (size_t)room * sizeof(planned_t));
            if (grown == NULL) {
                return -1;
            }
            p->members = grown;
            p->members_room = room;
        }
        m = &p->members[p->nmembers];
        m->stored = PyMem_RawMalloc((size_t)stored_len);
        if (m->stored == NULL) {
            return -1;
        }
        p->nmembers++;
        memcpy(m->stored, stored, (size_t)stored_len);
        m->start = i;
        m->end = j;
        m->stored_len = stored_len;
        m->raw_len = raw_len;
        m->flags = flags | (is_lines ? JP_FLAG_LINES : 0);
        m->min_ts = min_ts;
        m->max_ts = max_ts;
        i = j;
    }
    return 1;
}

/* Join the data of member `m` into `out` (its size); returns its CRC-32.  No GIL. */
static unsigned long
plan_fill(const plan_t *p, const planned_t *m, char *out)
{
    Py_ssize_t k;
    char *start = out;
    uLong crc;
    for (k = m->start; k < m->end; k++) {
        memcpy(out, p->ptr[k], (size_t)p->len[k]);
        out += p->len[k];
    }
    crc = crc32(0L, Z_NULL, 0);
    while (out > start) {
        /* zlib's length is a uInt: in pieces of at most 1 GiB. */
        Py_ssize_t piece = out - start > (1 << 30) ? (1 << 30) : out - start;
        crc = crc32(crc, (const Bytef *)start, (uInt)piece);
        start += piece;
    }
    return (unsigned long)crc;
}

PyDoc_STRVAR(plan_members_doc,
"plan_members(items, timestamps, sequences, ordinals, max_member_raw, lines, max_table_bytes,\n"
"             newlines=False)\n"
"    -> [(end, data, crc, table, flags, table_raw_size, min_ts, max_ts), ...] | None\n\n"
"storage/format.py's _plan_members_py in C: split the batch (lists of equal length: bytes\n"
"items, int columns) into members of at most `max_member_raw` data bytes whose stored table\n"
"fits `max_table_bytes`, and give per member (in order) the index after its last message,\n"
"its data (the items joined) and the data's CRC-32, its stored table (deflated when\n"
"smaller; flags bit 0) and\n"
"flags (bit 1: a line table, when `lines` and every message of the member ends with its\n"
"only newline), the serialized table's size, and the smallest and largest timestamp.\n"
"Returns None when the reference path must decide: an item that is not bytes (or, with\n"
"`newlines`, does not end with a newline), a value that\n"
"is not an int or is out of range (timestamps and ordinals int64, sequences uint64),\n"
"ordinals not strictly increasing, a member over 4 GiB.  Pool thread: the inputs are read\n"
"with the GIL, then (for a batch of at least 256 KiB or 4096 messages) the GIL is released\n"
"while the members are planned, their tables encoded and deflated and their data joined\n"
"and checksummed.");

static PyObject *
plan_members(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *snapshot = NULL, *result = NULL;
    PyObject **datas = NULL;
    Py_ssize_t *guess = NULL, ndatas = 0;
    PyThreadState *save = NULL;
    plan_t p;
    Py_ssize_t k, n, max_table;
    long long max_raw;
    int lines, overflow = 0, status = 0, release, filled = 0, newlines = 0;
    int packed_ts, packed_seq, packed_ord;

    (void)self;
    memset(&p, 0, sizeof(p));
    if ((nargs != 7 && nargs != 8) || !PyList_Check(args[0])
        || !(PyList_Check(args[1]) || PyObject_CheckBuffer(args[1]))
        || !(PyList_Check(args[2]) || PyObject_CheckBuffer(args[2]))
        || !(PyList_Check(args[3]) || PyObject_CheckBuffer(args[3]))) {
        PyErr_SetString(PyExc_TypeError,
                        "plan_members(items: list, timestamps, sequences, ordinals (lists or "
                        "packed int columns), max_member_raw, lines, max_table_bytes, "
                        "newlines=False)");
        return NULL;
    }
    if (nargs == 8) {
        newlines = PyObject_IsTrue(args[7]);
        if (newlines < 0) {
            return NULL;
        }
    }
    n = PyList_GET_SIZE(args[0]);
    for (k = 1; k <= 3; k++) {
        Py_ssize_t size = column_size(args[k]);
        if (size < 0) {
            return NULL;
        }
        if (size != n) {
            Py_RETURN_NONE;
        }
    }
    if (n == 0) {
        Py_RETURN_NONE;
    }
    max_raw = PyLong_AsLongLongAndOverflow(args[4], &overflow);
    if (max_raw == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow > 0) {
        max_raw = LLONG_MAX;
    }
    if (overflow < 0 || max_raw < 1) {
        Py_RETURN_NONE;
    }
    lines = PyObject_IsTrue(args[5]);
    if (lines < 0) {
        return NULL;
    }
    max_table = PyLong_AsSsize_t(args[6]);
    if (max_table == -1 && PyErr_Occurred()) {
        return NULL;
    }
    /* The snapshot: a tuple holding every item, so that the list may change (on another
     * thread) while the GIL is released without the bytes read going away. */
    snapshot = PyList_AsTuple(args[0]);
    if (snapshot == NULL) {
        return NULL;
    }
    p.n = n;
    p.ptr = PyMem_RawMalloc(sizeof(char *) * (size_t)n);
    p.len = PyMem_RawMalloc(sizeof(Py_ssize_t) * (size_t)n);
    p.cum = PyMem_RawMalloc(sizeof(Py_ssize_t) * (size_t)(n + 1));
    p.nonline = PyMem_RawMalloc(sizeof(Py_ssize_t) * (size_t)(n + 1));
    p.ts = PyMem_RawMalloc(sizeof(int64_t) * (size_t)n);
    p.seq = PyMem_RawMalloc(sizeof(uint64_t) * (size_t)n);
    p.ord = PyMem_RawMalloc(sizeof(int64_t) * (size_t)n);
    if (p.ptr == NULL || p.len == NULL || p.cum == NULL || p.nonline == NULL || p.ts == NULL
        || p.seq == NULL || p.ord == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Packed int columns are copied whole; a list's items are read one by one below.  A
     * buffer of another kind: None, the reference path. */
    packed_ts = take_int_column(args[1], n, 0, p.ts);
    packed_seq = packed_ts < 0 ? -1 : take_int_column(args[2], n, 1, p.seq);
    packed_ord = packed_seq < 0 ? -1 : take_int_column(args[3], n, 0, p.ord);
    if (packed_ord < 0) {
        goto done; /* an error, or None for another kind of column */
    }
    p.cum[0] = 0;
    for (k = 0; k < n; k++) {
        PyObject *item = PyTuple_GET_ITEM(snapshot, k);
        if (!PyBytes_Check(item)) {
            goto done; /* None: the reference path */
        }
        p.ptr[k] = PyBytes_AS_STRING(item);
        p.len[k] = PyBytes_GET_SIZE(item);
        if (newlines && (p.len[k] == 0 || p.ptr[k][p.len[k] - 1] != '\n')) {
            goto done; /* None: the caller raises its error */
        }
        p.cum[k + 1] = p.cum[k] + p.len[k];
        if ((!packed_ts && !list_item_i64(args[1], k, &p.ts[k]))
            || (!packed_ord && !list_item_i64(args[3], k, &p.ord[k]))) {
            goto done;
        }
        if (!packed_seq) {
            PyObject *s = PyList_GET_ITEM(args[2], k);
            if (!PyLong_Check(s) || _PyLong_Sign(s) < 0) {
                goto done;
            }
            p.seq[k] = as_u64(s);
            if (p.seq[k] == (uint64_t)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                goto done;
            }
        }
    }

    /* The members' data are bytes objects allocated now, with the GIL, for the boundaries
     * max_member_raw gives (the table shrink rule, for many tiny messages, rarely changes
     * them), and filled below without it: nothing else can see them yet. */
    {
        Py_ssize_t i = 0, room = 8;
        datas = PyMem_Calloc((size_t)room, sizeof(PyObject *));
        guess = PyMem_RawMalloc((size_t)room * sizeof(Py_ssize_t));
        if (datas == NULL || guess == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        while (i < n) {
            Py_ssize_t j = i + 1;
            while (j < n && (long long)(p.cum[j + 1] - p.cum[i]) <= max_raw) {
                j++;
            }
            if (ndatas == room) {
                PyObject **grown_d;
                Py_ssize_t *grown_g;
                room *= 2;
                grown_d = PyMem_Realloc(datas, (size_t)room * sizeof(PyObject *));
                if (grown_d == NULL) {
                    PyErr_NoMemory();
                    goto done;
                }
                datas = grown_d;
                grown_g = PyMem_RawRealloc(guess, (size_t)room * sizeof(Py_ssize_t));
                if (grown_g == NULL) {
                    PyErr_NoMemory();
                    goto done;
                }
                guess = grown_g;
            }
            datas[ndatas] = PyBytes_FromStringAndSize(NULL, p.cum[j] - p.cum[i]);
            if (datas[ndatas] == NULL) {
                goto done;
            }
            guess[ndatas++] = j;
            i = j;
        }
    }

    /* The GIL is released for batches worth it: handing it over and taking it back has a
     * cost of its own (the reactor thread is made to drop it). */
    release = p.cum[n] >= JP_RELEASE_BYTES || n >= JP_RELEASE_ITEMS;
    if (release) {
        save = PyEval_SaveThread();
    }
    p.nonline[0] = 0;
    for (k = 0; k < n; k++) {
        /* A line: at least one byte, the last a newline, no other newline. */
        Py_ssize_t len = p.len[k];
        int is_line = !lines
                      || (len > 0 && p.ptr[k][len - 1] == '\n'
                          && memchr(p.ptr[k], '\n', (size_t)(len - 1)) == NULL);
        p.nonline[k + 1] = p.nonline[k] + !is_line;
    }
    status = plan_run(&p, lines, max_raw, max_table);
    if (status > 0 && p.nmembers == ndatas) {
        filled = 1;
        for (k = 0; k < ndatas; k++) {
            if (p.members[k].end != guess[k]) {
                filled = 0;
                break;
            }
        }
        for (k = 0; filled && k < ndatas; k++) {
            p.members[k].crc = plan_fill(&p, &p.members[k], PyBytes_AS_STRING(datas[k]));
        }
    }
    if (release) {
        PyEval_RestoreThread(save);
    }

    if (status < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (status == 0) {
        goto done;
    }
    if (!filled) {
        /* Shrunk members: their data, with the GIL (rare). */
        for (k = 0; k < ndatas; k++) {
            Py_CLEAR(datas[k]);
        }
        if (p.nmembers > ndatas) {
            PyObject **grown_d = PyMem_Realloc(datas, (size_t)p.nmembers * sizeof(PyObject *));
            if (grown_d == NULL) {
                ndatas = 0;
                PyErr_NoMemory();
                goto done;
            }
            datas = grown_d;
        }
        for (k = 0; k < p.nmembers; k++) {
            datas[k] = NULL;
        }
        ndatas = p.nmembers;
        for (k = 0; k < p.nmembers; k++) {
            datas[k] = PyBytes_FromStringAndSize(NULL, p.cum[p.members[k].end]
                                                           - p.cum[p.members[k].start]);
            if (datas[k] == NULL) {
                goto done;
            }
            p.members[k].crc = plan_fill(&p, &p.members[k], PyBytes_AS_STRING(datas[k]));
        }
    }
    result = PyList_New(p.nmembers);
    if (result == NULL) {
        goto done;
    }
    for (k = 0; k < p.nmembers; k++) {
        planned_t *m = &p.members[k];
        PyObject *member = Py_BuildValue("(nOky#inLL)", m->end, datas[k], m->crc,
                                         (const char *)m->stored, m->stored_len, m->flags,
                                         m->raw_len, (long long)m->min_ts,
                                         (long long)m->max_ts);
        if (member == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, k, member);
    }

done:
    if (datas != NULL) {
        for (k = 0; k < ndatas; k++) {
            Py_XDECREF(datas[k]);
        }
        PyMem_Free(datas);
    }
    PyMem_RawFree(guess);
    plan_free(&p);
    Py_DECREF(snapshot);
    if (result == NULL && !PyErr_Occurred()) {
        Py_RETURN_NONE;
    }
    return result;
}

/* -- member table decoding (the query path) ------------------------------------------------ */

PyDoc_STRVAR(decode_table_doc,
"decode_table(raw, count, min_timestamp, first_sequence, first_ordinal, lines=False)\n"
"    -> (lengths, timestamps, sequences, ordinals, total_length, min_ts, max_ts) | None\n"
"\n"
"Decode a member table serialized the canonical way (fields 1-4 once each, in order, each\n"
"packed, exactly `count` values; with `lines` true, a line table: fields 2-4 only, and\n"
"`lengths` is None and `total_length` 0) into its columns: the deltas accumulated from the\n"
"header's bases with 64-bit wrap-around (timestamps and ordinals signed, sequences\n"
"unsigned), as storage.format._decode_table does.  Also returns the sum of the lengths and\n"
"the smallest and largest timestamp for the caller's checks.  Returns None for anything\n"
"else (another encoding, a malformed varint, a wrong count, a sum beyond 64 bits): the\n"
"caller then takes the reference path, which accepts every valid encoding and reports\n"
"corruption.");

/* Read a varint of at most 10 bytes with no bits beyond 64; 0 on failure. */
static inline int
read_varint64(const unsigned char **pp, const unsigned char *end, uint64_t *out)
{
    const unsigned char *p = *pp;
    uint64_t v = 0;
    int shift = 0;
    while (p < end) {
        unsigned char b = *p++;
        if (shift == 63 && (b & 0x7e)) {
            return 0;
        }
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *pp = p;
            *out = v;
            return 1;
        }
        shift += 7;
        if (shift > 63) {
            return 0;
        }
    }
    return 0;
}

static PyObject *
decode_table(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    PyObject *cols[4] = {NULL, NULL, NULL, NULL};
    PyObject *result = NULL;
    const unsigned char *p, *end;
    Py_ssize_t n, i;
    int field, first = 0;
    int64_t min_ts = 0, max_ts = 0;
    uint64_t acc[4], total = 0;

    if (nargs != 5 && nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "decode_table() takes 5 or 6 arguments");
        return NULL;
    }
    if (nargs == 6) {
        int lines = PyObject_IsTrue(args[5]);
        if (lines < 0) {
            return NULL;
        }
        first = lines ? 1 : 0;
    }
    n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    /* Bases: min_timestamp and first_ordinal are int64, first_sequence uint64; any other
     * value (or count 0) goes to the reference path. */
    {
        long long ts0 = PyLong_AsLongLong(args[2]);
        unsigned long long seq0;
        long long ord0;
        if (ts0 == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        seq0 = PyLong_AsUnsignedLongLong(args[3]);
        if (seq0 == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        ord0 = PyLong_AsLongLong(args[4]);
        if (ord0 == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        acc[0] = 0;
        acc[1] = (uint64_t)ts0;
        acc[2] = (uint64_t)seq0;
        acc[3] = (uint64_t)ord0;
    }
    if (n <= 0) {
        Py_RETURN_NONE;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    p = (const unsigned char *)view.buf;
    end = p + view.len;
    for (field = first; field < 4; field++) {
        uint64_t key, size;
        const unsigned char *stop;
        cols[field] = PyList_New(n);
        if (cols[field] == NULL) {
            goto done;
        }
        if (!read_varint64(&p, end, &key) || key != (uint64_t)(((field + 1) << 3) | 2)) {
            goto fallback;
        }
        if (!read_varint64(&p, end, &size) || size > (uint64_t)(end - p)) {
            goto fallback;
        }
        stop = p + size;
        for (i = 0; i < n; i++) {
            uint64_t raw;
            PyObject *value;
            if (!read_varint64(&p, stop, &raw)) {
                goto fallback;
            }
            if (field == 0) {
                if (total + raw < total) {
                    goto fallback; /* the sum needs more than 64 bits */
                }
                total += raw;
                value = PyLong_FromUnsignedLongLong(raw);
            }
            else {
                uint64_t delta = raw;
                if (field != 3) { /* sint64: zigzag */
                    delta = (raw >> 1) ^ (0 - (raw & 1));
                }
                acc[field] += delta; /* modulo 2**64, as the reference wraps */
                if (field == 2) {
                    value = PyLong_FromUnsignedLongLong(acc[field]);
                }
                else {
                    int64_t v = (int64_t)acc[field];
                    if (field == 1) {
                        if (i == 0 || v < min_ts) {
                            min_ts = v;
                        }
                        if (i == 0 || v > max_ts) {
                            max_ts = v;
                        }
                    }
                    value = PyLong_FromLongLong(v);
                }
            }
            if (value == NULL) {
                goto done;
            }
            PyList_SET_ITEM(cols[field], i, value);
        }
        if (p != stop) {
            goto fallback;
        }
    }
    if (p != end) {
        goto fallback;
    }
    {
        PyObject *tail[3];
        tail[0] = PyLong_FromUnsignedLongLong(total);
        tail[1] = PyLong_FromLongLong(min_ts);
        tail[2] = PyLong_FromLongLong(max_ts);
        result = PyTuple_New(7);
        if (result == NULL || tail[0] == NULL || tail[1] == NULL || tail[2] == NULL) {
            Py_XDECREF(result);
            result = NULL;
            for (i = 0; i < 3; i++) {
                Py_XDECREF(tail[i]);
            }
            goto done;
        }
        if (first) {
            Py_INCREF(Py_None);
            PyTuple_SET_ITEM(result, 0, Py_None); /* a line table has no lengths */
        }
        for (field = first; field < 4; field++) {
            PyTuple_SET_ITEM(result, field, cols[field]); /* steals the reference */
            cols[field] = NULL;
        }
        for (i = 0; i < 3; i++) {
            PyTuple_SET_ITEM(result, 4 + i, tail[i]);
        }
    }
    goto done;

fallback:
    result = Py_None;
    Py_INCREF(result);

done:
    PyBuffer_Release(&view);
    for (field = 0; field < 4; field++) {
        Py_XDECREF(cols[field]);
    }
    return result;
}

/* -- line_bounds: message offsets of a line member's data (the query path) ----------------- */

PyDoc_STRVAR(line_bounds_doc,
"line_bounds(data, count) -> list | None\n\n"
"The `count + 1` offsets `[0, end of line 0, ..., len(data)]` of the lines of `data` (a\n"
"bytes-like object): message i of a line member is `data[bounds[i]:bounds[i + 1]]`, each\n"
"ending with its newline.  None when `data` does not hold exactly `count` newlines with\n"
"the last one at its end (the member is corrupt).  Any thread; holds the GIL.");

static PyObject *
line_bounds(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    PyObject *bounds = NULL, *value;
    const char *p, *end, *nl;
    Py_ssize_t count, k = 1;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "line_bounds() takes exactly 2 arguments");
        return NULL;
    }
    count = PyLong_AsSsize_t(args[1]);
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (count < 0) {
        Py_RETURN_NONE;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    p = (const char *)view.buf;
    end = p + view.len;
    /* At most one newline per byte: a count beyond the size cannot match (and must not
     * size the list). */
    if (count > view.len || (view.len > 0 && end[-1] != '\n') || (view.len == 0 && count)) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    bounds = PyList_New(count + 1);
    if (bounds == NULL) {
        goto done;
    }
    value = PyLong_FromLong(0);
    if (value == NULL) {
        goto fail;
    }
    PyList_SET_ITEM(bounds, 0, value);
    while (p < end && (nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        if (k > count) {
            goto mismatch;
        }
        value = PyLong_FromSsize_t((nl + 1) - (const char *)view.buf);
        if (value == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(bounds, k, value);
        k++;
        p = nl + 1;
    }
    if (k != count + 1) {
        goto mismatch;
    }
    goto done;

mismatch:
    Py_DECREF(bounds);
    bounds = Py_None;
    Py_INCREF(bounds);
    goto done;

fail:
    Py_CLEAR(bounds);

done:
    PyBuffer_Release(&view);
    return bounds;
}

/* ---- metric_json_line: the stored JSON line of a metric sample (storage/format.py) --------- */

/* DiskIO and NetworkIO: four int64 fields 1..4.  0 when not canonical (see metric_fields). */
static int
parse_io(const unsigned char *p, const unsigned char *end, int64_t out[4])
{
    uint64_t value;
    while (p < end) {
        uint32_t field, wire;
        if (!read_tag(&p, end, &field, &wire)) {
            return 0;
        }
        if (field >= 1 && field <= 4) {
            if (wire != 0 || !read_varint(&p, end, 10, &value)) {
                return 0;
            }
            out[field - 1] = (int64_t)value;
        }
        else if (wire == 3 || wire == 4 || !skip_field(&p, end, wire)) {
            return 0;
        }
    }
    return 1;
}

typedef struct {
    int64_t timestamp;
    uint64_t sequence;
    double cpu, gpu;
    int64_t memory;
    int64_t io[8]; /* disk read/write bytes, read/write ops; network rx/tx bytes, packets */
} MetricValues;

static inline double
read_double(const unsigned char *p)
{
    uint64_t bits = 0;
    double d;
    int i;
    for (i = 7; i >= 0; i--) {
        bits = (bits << 8) | p[i];
    }
    memcpy(&d, &bits, 8);
    return d;
}

/* MetricData: 1 cpu_usage double, 2 memory_usage int64, 3 gpu_usage double, 4 disk_io,
 * 5 network_io. */
static int
parse_metric_data(const unsigned char *p, const unsigned char *end, MetricValues *m)
{
    uint64_t value;
    Py_ssize_t size;
    int seen_disk = 0, seen_net = 0;
    while (p < end) {
        uint32_t field, wire;
        if (!read_tag(&p, end, &field, &wire)) {
            return 0;
        }
        switch (field) {
        case 1:
        case 3:
            if (wire != 1 || end - p < 8) {
                return 0;
            }
            if (field == 1) {
                m->cpu = read_double(p);
            }
            else {
                m->gpu = read_double(p);
            }
            p += 8;
            break;
        case 2:
            if (wire != 0 || !read_varint(&p, end, 10, &value)) {
                return 0;
            }
            m->memory = (int64_t)value;
            break;
        case 4:
        case 5:
            if (wire != 2 || !read_size(&p, end, &size)) {
                return 0;
            }
            if (field == 4 ? seen_disk++ : seen_net++) {
                return 0; /* repeated: upb merges them */
            }
            if (!parse_io(p, p + size, m->io + (field == 4 ? 0 : 4))) {
                return 0;
            }
            p += size;
            break;
        default:
            if (wire == 3 || wire == 4 || !skip_field(&p, end, wire)) {
                return 0;
            }
        }
    }
    return 1;
}

/* Metric: 1 job_uuid string (checked, ignored), 2 timestamp int64, 3 sequence uint64,
 * 4 data MetricData.  Canonical payloads only: every known field with its own wire type,
 * embedded messages at most once, no groups; scalars: the last occurrence wins.  0 for
 * anything else (the caller then takes the protobuf route, which decides). */
static int
parse_metric(const unsigned char *p, const unsigned char *end, MetricValues *m)
{
    uint64_t value;
    Py_ssize_t size;
    int seen_data = 0;
    memset(m, 0, sizeof(*m));
    while (p < end) {
        uint32_t field, wire;
        if (!read_tag(&p, end, &field, &wire)) {
            return 0;
        }
        switch (field) {
        case 1:
            if (wire != 2 || !read_size(&p, end, &size) || !utf8_valid(p, size)) {
                return 0;
            }
            p += size;
            break;
        case 2:
            if (wire != 0 || !read_varint(&p, end, 10, &value)) {
                return 0;
            }
            m->timestamp = (int64_t)value;
            break;
        case 3:
            if (wire != 0 || !read_varint(&p, end, 10, &m->sequence)) {
                return 0;
            }
            break;
        case 4:
            if (wire != 2 || seen_data++ || !read_size(&p, end, &size)
                || !parse_metric_data(p, p + size, m)) {
                return 0;
            }
            p += size;
            break;
        default:
            if (wire == 3 || wire == 4 || !skip_field(&p, end, wire)) {
                return 0;
            }
        }
    }
    return 1;
}

/* Decimal text of integers, as int.__repr__ writes them (snprintf is several times slower). */
static inline char *
put_u64_text(char *o, uint64_t v)
{
    char tmp[20];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) {
        *o++ = tmp[--n];
    }
    return o;
}

static inline char *
put_i64_text(char *o, int64_t v)
{
    if (v < 0) {
        *o++ = '-';
        return put_u64_text(o, (uint64_t)0 - (uint64_t)v);
    }
    return put_u64_text(o, (uint64_t)v);
}

/* Copy a string literal to `o`; the position after it. */
#define PUT_LITERAL(o, lit) (memcpy((o), (lit), sizeof(lit) - 1), (o) + sizeof(lit) - 1)

/* A double as json.dumps writes it (float.__repr__), or null when not finite. */
static int
put_double(char *buf, size_t room, double v)
{
    char *text;
    int n;
    if (!isfinite(v)) {
        return snprintf(buf, room, "null");
    }
    text = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL) {
        return -1;
    }
    n = snprintf(buf, room, "%s", text);
    PyMem_Free(text);
    return n;
}

/* Strip `digits` (nd of them) of trailing zeros; the count left. */
static int
strip_zeros(const char *digits, int nd)
{
    while (nd > 1 && digits[nd - 1] == '0') {
        nd--;
    }
    return nd;
}

#ifdef __SIZEOF_INT128__
typedef unsigned __int128 jp_u128;

static const uint64_t pow10_u64[20] = {
    1ULL, 10ULL, 100ULL, 1000ULL, 10000ULL, 100000ULL, 1000000ULL, 10000000ULL,
    100000000ULL, 1000000000ULL, 10000000000ULL, 100000000000ULL, 1000000000000ULL,
    10000000000000ULL, 100000000000000ULL, 1000000000000000ULL, 10000000000000000ULL,
    100000000000000000ULL, 1000000000000000000ULL, 10000000000000000000ULL,
};

/* What printf("%.{n-1}e") and strtod tell put_double_nogil, in integers: the nearest n-digit
 * decimal (ties to even, as printf rounds) of a = m * 2^e, with m < 2^53 and a in [1e-3,
 * 1e14) (so -63 <= e < 0), n 15..17, starting from `estimate` of floor(log10(a)) (off by
 * one at most): its n digits `*digits` and the power of ten of its first digit `*exponent`.
 * 1 when it reads back as a (lies within a's rounding interval, the ends included when m
 * is even, as strtod rounds), 0 when not, -1 outside these bounds.  Within them m * 10^19
 * and digits * 2^64 stay below 2^128. */
static int
nearest_decimal(uint64_t m, int e, int estimate, int n, uint64_t *digits, int *exponent)
{
    int tries, point = estimate;
    for (tries = 0; tries < 3; tries++) {
        int k = point - n + 1; /* the decimal is q * 10^k */
        int s = -e;
        jp_u128 num, q, rem, half, scaled, low, high;
        if (k > 0 || k < -19 || s < 1 || s > 63) {
            return -1;
        }
        num = (jp_u128)m * pow10_u64[-k]; /* a * 10^-k * 2^s */
        q = num >> s;                      /* floor(a * 10^-k): n digits iff `point` is right */
        if (q >= pow10_u64[n] || q < pow10_u64[n - 1]) {
            point += q < pow10_u64[n - 1] ? -1 : 1;
            continue;
        }
        rem = num - (q << s);
        half = (jp_u128)1 << (s - 1);
        if (rem > half || (rem == half && (q & 1))) {
            q++;
        }
        if (q == pow10_u64[n]) { /* rounded up to the next power of ten */
            q = pow10_u64[n - 1];
            k++;
            point++;
        }
        *digits = (uint64_t)q;
        *exponent = point;
        /* q * 10^k against (2m -+ 1) * 2^(e-1), both times 2^(1-e) * 10^-k. */
        scaled = q << (1 - e);
        low = (jp_u128)(2 * m - 1) * pow10_u64[-k];
        high = (jp_u128)(2 * m + 1) * pow10_u64[-k];
        if (m & 1) {
            return scaled > low && scaled < high;
        }
        return scaled >= low && scaled <= high;
    }
    return -1;
}

/* put_double_nogil's digits of `a` (positive, normal, not a power of two) in [1e-3, 1e14)
 * without printf: into `digits` (room for 17), their count, and the power of ten of the first
 * in `*exponent`; -1 when nearest_decimal cannot say. */
static int
exact_digits(double a, char *digits, int *exponent)
{
    int binary_exp, estimate, nd, ok;
    uint64_t m, q;
    m = (uint64_t)ldexp(frexp(a, &binary_exp), 53);
    estimate = (int)floor(log10(a));
    /* 16 digits; if they read back, 15 when they do too; else 17. */
    ok = nearest_decimal(m, binary_exp - 53, estimate, 16, &q, exponent);
    nd = 16;
    if (ok == 1) {
        uint64_t q15;
        int exponent15;
        ok = nearest_decimal(m, binary_exp - 53, *exponent, 15, &q15, &exponent15);
        if (ok < 0) {
            return -1;
        }
        if (ok == 1) {
            q = q15;
            *exponent = exponent15;
            nd = 15;
        }
    }
    else if (ok == 0) {
        nd = 17;
        if (nearest_decimal(m, binary_exp - 53, *exponent, 17, &q, exponent) != 1) {
            return -1;
        }
    }
    else {
        return -1;
    }
    put_u64_text(digits, q); /* exactly nd digits: q is in [10^(nd-1), 10^nd) */
    return nd;
}
#endif

/* put_double without the interpreter: Python's float repr (the shortest decimal that reads
 * back as `v`, the nearest of that length, its digits placed as repr places them), written
 * without the GIL.
 *
 * The nearest 15-digit decimal of a double that some k <= 15 digit decimal reads back as
 * is that decimal padded with zeros (the double lies within half an ulp of it, far inside
 * the 15-digit rounding interval), so stripping its zeros gives the shortest when it reads
 * back; else the nearest 16-digit decimal when it reads back (tried first: when it does
 * not, neither does any shorter one), else the nearest 17-digit one, which always does.
 *
 * -1 where this cannot be sure of repr's choice: an exact power of two (its rounding
 * interval is lopsided, so the nearest decimal of a length need not be the one repr picks),
 * a subnormal (fewer bits: its interval can be wider than the 15-digit argument allows), or
 * text not in the "C" locale's form; the caller then takes put_double with the GIL. */
static int
put_double_nogil(char *buf, size_t room, double v)
{
    char tmp[48], digits[24];
    const char *c;
    int nd = 0, exponent, decpt, k, m, mantissa_exp;
    char *o = buf;
    double a;

    if (!isfinite(v)) {
        return snprintf(buf, room, "null");
    }
    if (v == 0.0) {
        return snprintf(buf, room, signbit(v) ? "-0.0" : "0.0");
    }
    a = fabs(v);
    if (room < 32 || fabs(frexp(v, &mantissa_exp)) == 0.5 || a < DBL_MIN) {
        return -1;
    }
#ifdef __SIZEOF_INT128__
    /* The common range (usages, rates) in integers: several times faster than printf. */
    nd = a >= 1e-3 && a < 1e14 ? exact_digits(a, digits, &exponent) : -1;
#else
    nd = -1;
#endif
    if (nd < 0) {
        /* d.ddde[+-]XX: 16 digits; if they read back, 15 when they do too; else 17. */
        nd = 0;
        snprintf(tmp, sizeof tmp, "%.15e", a);
        if (strtod(tmp, NULL) == a) {
            char shorter[48];
            snprintf(shorter, sizeof shorter, "%.14e", a);
            if (strtod(shorter, NULL) == a) {
                memcpy(tmp, shorter, sizeof tmp);
            }
        }
        else {
            snprintf(tmp, sizeof tmp, "%.16e", a);
        }
        for (c = tmp; *c != 'e'; c++) {
            if (*c >= '0' && *c <= '9' && nd < (int)sizeof digits) {
                digits[nd++] = *c;
            }
            else if (*c != '.' || c != tmp + 1) {
                return -1;
            }
        }
        exponent = (int)strtol(c + 1, NULL, 10);
    }
    nd = strip_zeros(digits, nd);
    decpt = exponent + 1; /* the point goes after `decpt` digits */
    if (v < 0) {
        *o++ = '-';
    }
    if (decpt <= -4 || decpt > 16) {
        /* 1.2345e+20, 5e-07: repr's exponent form, at least two exponent digits */
        *o++ = digits[0];
        if (nd > 1) {
            *o++ = '.';
            memcpy(o, digits + 1, (size_t)nd - 1);
            o += nd - 1;
        }
        o += sprintf(o, "e%+.02d", decpt - 1);
    }
    else if (decpt <= 0) {
        *o++ = '0';
        *o++ = '.';
        for (k = 0; k < -decpt; k++) {
            *o++ = '0';
        }
        memcpy(o, digits, (size_t)nd);
        o += nd;
    }
    else if (decpt >= nd) {
        memcpy(o, digits, (size_t)nd);
        o += nd;
        for (m = nd; m < decpt; m++) {
            *o++ = '0';
        }
        *o++ = '.';
        *o++ = '0';
    }
    else {
        memcpy(o, digits, (size_t)decpt);
        o += decpt;
        *o++ = '.';
        memcpy(o, digits + decpt, (size_t)(nd - decpt));
        o += nd - decpt;
    }
    *o = '\0';
    return (int)(o - buf);
}

/* The stored JSON line of metric `m` at `o` (room: job_len + 640 bytes), with `cpu` and `gpu`
 * the texts of its usages (put_double); the position after it.  No GIL needed. */
static char *
put_metric_line(char *o, const char *job, Py_ssize_t job_len, const MetricValues *m,
                const char *cpu, const char *gpu)
{
    size_t cpu_len = strlen(cpu), gpu_len = strlen(gpu);
    o = PUT_LITERAL(o, "{\"job_uuid\":");
    memcpy(o, job, (size_t)job_len);
    o += job_len;
    o = PUT_LITERAL(o, ",\"timestamp\":");
    o = put_i64_text(o, m->timestamp);
    o = PUT_LITERAL(o, ",\"sequence\":");
    o = put_u64_text(o, m->sequence);
    o = PUT_LITERAL(o, ",\"data\":{\"cpu_usage\":");
    memcpy(o, cpu, cpu_len);
    o += cpu_len;
    o = PUT_LITERAL(o, ",\"memory_usage\":");
    o = put_i64_text(o, m->memory);
    o = PUT_LITERAL(o, ",\"gpu_usage\":");
    memcpy(o, gpu, gpu_len);
    o += gpu_len;
    o = PUT_LITERAL(o, ",\"disk_io\":{\"read_bytes\":");
    o = put_i64_text(o, m->io[0]);
    o = PUT_LITERAL(o, ",\"write_bytes\":");
    o = put_i64_text(o, m->io[1]);
    o = PUT_LITERAL(o, ",\"read_ops\":");
    o = put_i64_text(o, m->io[2]);
    o = PUT_LITERAL(o, ",\"write_ops\":");
    o = put_i64_text(o, m->io[3]);
    o = PUT_LITERAL(o, "},\"network_io\":{\"rx_bytes\":");
    o = put_i64_text(o, m->io[4]);
    o = PUT_LITERAL(o, ",\"tx_bytes\":");
    o = put_i64_text(o, m->io[5]);
    o = PUT_LITERAL(o, ",\"rx_packets\":");
    o = put_i64_text(o, m->io[6]);
    o = PUT_LITERAL(o, ",\"tx_packets\":");
    o = put_i64_text(o, m->io[7]);
    o = PUT_LITERAL(o, "}}}\n");
    return o;
}

PyDoc_STRVAR(metric_json_line_doc,
"metric_json_line(job_json, payload) -> bytes or None\n\n"
"The stored JSON line of a serialized joblet.ipc.Metric (storage/format.py's\n"
"metric_json_line) with `job_json` (an ASCII str: the job id as a JSON string) in place;\n"
"None when the payload is not canonical (the caller takes the protobuf route).  Pool thread.");

static PyObject *
metric_json_line(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    MetricValues m;
    const char *job;
    Py_ssize_t job_len;
    char cpu[40], gpu[40], *buf, stack[1024];
    PyObject *result;
    int n;
    size_t room;
    const unsigned char *p;

    (void)self;
    if (nargs != 2 || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "metric_json_line(job_json: str, payload)");
        return NULL;
    }
    if (!PyBytes_Check(args[1]) || !PyUnicode_IS_ASCII(args[0])) {
        Py_RETURN_NONE;
    }
    p = (const unsigned char *)PyBytes_AS_STRING(args[1]);
    if (!parse_metric(p, p + PyBytes_GET_SIZE(args[1]), &m)) {
        Py_RETURN_NONE;
    }
    job = PyUnicode_AsUTF8AndSize(args[0], &job_len);
    if (job == NULL) {
        return NULL;
    }
    if (put_double(cpu, sizeof(cpu), m.cpu) < 0 || put_double(gpu, sizeof(gpu), m.gpu) < 0) {
        return NULL;
    }
    room = (size_t)job_len + 640;
    buf = room <= sizeof(stack) ? stack : PyMem_Malloc(room);
    if (buf == NULL) {
        return PyErr_NoMemory();
    }
    n = (int)(put_metric_line(buf, job, job_len, &m, cpu, gpu) - buf);
    result = PyBytes_FromStringAndSize(buf, n);
    if (buf != stack) {
        PyMem_Free(buf);
    }
    return result;
}

/* ---- metric_json_lines: metric_json_line over a batch (storage/diskwork.py) --------------- */

PyDoc_STRVAR(metric_json_lines_doc,
"metric_json_lines(job_json, payloads) -> list\n\n"
"metric_json_line(job_json, payload) for each payload of the list `payloads`, in one call:\n"
"a list of the same length whose items are the line, or None where metric_json_line gives\n"
"None (the caller takes the protobuf route for those).  Pool thread: for a batch of at\n"
"least 256 payloads the payloads are parsed and the lines written without the GIL, the\n"
"usages' float texts too (repr's digits, found with snprintf and strtod; exact powers of\n"
"two and subnormals take the interpreter's float repr, with the GIL); the bytes objects\n"
"need it.");

/* Room for a usage's text (put_double). */
#define USAGE_TEXT 40


/* A batch's payloads as the line builders read them without the GIL: `snapshot`, a tuple of
 * the list that keeps every payload alive, and for payload i its bytes in ptr[i], len[i] with
 * start[i] 0, or start[i] -1 where it is not a bytes object (the C route does not take it).
 * The arrays have room for n + 2 entries. */
typedef struct {
    PyObject *snapshot;
    const unsigned char **ptr;
    Py_ssize_t *len, *start;
} Payloads;

/* Fill `p` from `list`, with the GIL; -1 with an exception set (payloads_free frees what
 * was made either way). */
static int
payloads_take(PyObject *list, Payloads *p)
{
    Py_ssize_t i, n = PyList_GET_SIZE(list);

    p->snapshot = PyList_AsTuple(list);
    if (p->snapshot == NULL) {
        return -1;
    }
    p->ptr = PyMem_RawMalloc(sizeof(*p->ptr) * (size_t)(n + 2));
    p->len = PyMem_RawMalloc(sizeof(*p->len) * (size_t)(n + 2));
    p->start = PyMem_RawMalloc(sizeof(*p->start) * (size_t)(n + 2));
    if (p->ptr == NULL || p->len == NULL || p->start == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n; i++) {
        PyObject *payload = PyTuple_GET_ITEM(p->snapshot, i);
        p->start[i] = PyBytes_Check(payload) ? 0 : -1;
        if (p->start[i] == 0) {
            p->ptr[i] = (const unsigned char *)PyBytes_AS_STRING(payload);
            p->len[i] = PyBytes_GET_SIZE(payload);
        }
    }
    return 0;
}

static void
payloads_free(Payloads *p)
{
    PyMem_RawFree((void *)p->ptr);
    PyMem_RawFree(p->len);
    PyMem_RawFree(p->start);
    Py_XDECREF(p->snapshot);
}

/* The list of ``n`` lines that a builder wrote one after another into data[0:total]
 * (without the GIL when ``save`` is set, which this takes back first): line i starts at
 * start[i] and ends where the next line starts, or at ``total``; start[i] < 0 gives None.
 * ``failed``: the builder ran out of memory (MemoryError). */
static PyObject *
lines_list(PyThreadState *save, int failed, const char *data, Py_ssize_t total,
           const Py_ssize_t *start, Py_ssize_t n)
{
    PyObject *out;
    Py_ssize_t i, k;

    if (save != NULL) {
        PyEval_RestoreThread(save);
    }
    if (failed) {
        return PyErr_NoMemory();
    }
    out = PyList_New(n);
    if (out == NULL) {
        return NULL;
    }
    for (i = 0; i < n; i++) {
        PyObject *line;
        Py_ssize_t end = total;
        if (start[i] < 0) {
            Py_INCREF(Py_None);
            PyList_SET_ITEM(out, i, Py_None);
            continue;
        }
        for (k = i + 1; k < n; k++) {
            if (start[k] >= 0) {
                end = start[k];
                break;
            }
        }
        line = PyBytes_FromStringAndSize(data + start[i], end - start[i]);
        if (line == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, line);
    }
    return out;
}

static PyObject *
metric_json_lines(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *out = NULL;
    const char *job;
    Py_ssize_t i, n, job_len, room, used = 0;
    MetricValues *vals = NULL;
    Payloads p = {NULL, NULL, NULL, NULL};
    const unsigned char **ptr;
    Py_ssize_t *len, *start;
    char *texts = NULL, *buf = NULL;
    int failed = 0;
    PyThreadState *save = NULL;

    (void)self;
    if (nargs != 2 || !PyUnicode_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "metric_json_lines(job_json: str, payloads: list)");
        return NULL;
    }
    n = PyList_GET_SIZE(args[1]);
    if (!PyUnicode_IS_ASCII(args[0])) {
        /* metric_json_line gives None for each. */
        out = PyList_New(n);
        for (i = 0; out != NULL && i < n; i++) {
            Py_INCREF(Py_None);
            PyList_SET_ITEM(out, i, Py_None);
        }
        return out;
    }
    job = PyUnicode_AsUTF8AndSize(args[0], &job_len);
    if (job == NULL) {
        return NULL;
    }
    /* With the GIL: the payloads' bytes (Payloads). */
    if (payloads_take(args[1], &p) < 0) {
        goto done;
    }
    ptr = p.ptr;
    len = p.len;
    start = p.start;
    vals = PyMem_RawMalloc(sizeof(*vals) * (size_t)(n + 1));
    texts = PyMem_RawMalloc((size_t)USAGE_TEXT * 2 * (size_t)(n + 1));
    if (vals == NULL || texts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Without the GIL (for a batch worth handing it over): the parsing, the usages' texts
     * (put_double_nogil; the few it leaves take the interpreter's float repr below, whose
     * dtoa memory pools the GIL guards), then every line into one buffer (a line takes at
     * most job_len + 640 bytes); line i is [start[i], start[i] + len[i]). */
    if (n >= JP_RELEASE_LINES) {
        save = PyEval_SaveThread();
    }
    {
        Py_ssize_t pending = 0;
        for (i = 0; i < n; i++) {
            char *cpu = texts + USAGE_TEXT * 2 * i, *gpu = cpu + USAGE_TEXT;
            if (start[i] == 0 && !parse_metric(ptr[i], ptr[i] + len[i], &vals[i])) {
                start[i] = -1;
            }
            if (start[i] < 0) {
                continue;
            }
            if (put_double_nogil(cpu, USAGE_TEXT, vals[i].cpu) < 0) {
                cpu[0] = 0;
                pending++;
            }
            if (put_double_nogil(gpu, USAGE_TEXT, vals[i].gpu) < 0) {
                gpu[0] = 0;
                pending++;
            }
        }
        if (pending) {
            if (save != NULL) {
                PyEval_RestoreThread(save);
                save = NULL;
            }
            for (i = 0; i < n; i++) {
                char *cpu = texts + USAGE_TEXT * 2 * i, *gpu = cpu + USAGE_TEXT;
                if (start[i] < 0) {
                    continue;
                }
                if ((cpu[0] == 0 && put_double(cpu, USAGE_TEXT, vals[i].cpu) < 0)
                    || (gpu[0] == 0 && put_double(gpu, USAGE_TEXT, vals[i].gpu) < 0)) {
                    goto done;
                }
            }
            if (n >= JP_RELEASE_LINES) {
                save = PyEval_SaveThread();
            }
        }
        room = 0;
        for (i = 0; i < n; i++) {
            if (start[i] < 0) {
                continue;
            }
            if (used + job_len + 640 > room) {
                char *grown;
                room = (used + job_len + 640) * 2;
                grown = PyMem_RawRealloc(buf, (size_t)room);
                if (grown == NULL) {
                    failed = 1;
                    break;
                }
                buf = grown;
            }
            start[i] = used;
            len[i] = put_metric_line(buf + used, job, job_len, &vals[i],
                                     texts + USAGE_TEXT * 2 * i,
                                     texts + USAGE_TEXT * (2 * i + 1)) - (buf + used);
            used += len[i];
        }
    }
    out = lines_list(save, failed, buf, used, start, n);

done:
    PyMem_RawFree(vals);
    PyMem_RawFree(texts);
    PyMem_RawFree(buf);
    payloads_free(&p);
    return out;
}

/* ---- event_json_lines: the stored JSON lines of telemetry events (events.py) -------------- */

/* Field codes of an event layout, as events.py's field types map to them. */
#define EV_U32 0
#define EV_U64 1
#define EV_I64 2
#define EV_STR 3
#define EV_STRS 4
#define EV_MAX_FIELDS 16

/* A growable output buffer. */
typedef struct {
    char *data;
    size_t len, room;
} OutBuf;

/* Room for `more` bytes; 0 when out of memory (no exception set: callers run without the
 * GIL, and set it once they hold it again). */
static int
out_reserve(OutBuf *b, size_t more)
{
    if (b->len + more > b->room) {
        size_t room = b->room ? b->room : 512;
        char *data;
        while (room < b->len + more) {
            room *= 2;
        }
        data = PyMem_RawRealloc(b->data, room);
        if (data == NULL) {
            return 0;
        }
        b->data = data;
        b->room = room;
    }
    return 1;
}

static inline int
out_put(OutBuf *b, const char *s, size_t n)
{
    if (!out_reserve(b, n)) {
        return 0;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 1;
}

static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* A string field's raw bytes as the stored JSON writes them (events._json_raw_text): valid
 * UTF-8 as a JSON string the way json.encoder.encode_basestring writes it (", \ and control
 * characters escaped, the rest as is), anything else as {"b64":"<standard base64>"}. */
static int
out_text(OutBuf *b, const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i;
    char *o;
    if (!utf8_valid(s, n)) {
        Py_ssize_t groups = (n + 2) / 3;
        if (!out_reserve(b, (size_t)groups * 4 + 12)) {
            return 0;
        }
        o = b->data + b->len;
        memcpy(o, "{\"b64\":\"", 8);
        o += 8;
        for (i = 0; i + 2 < n; i += 3) {
            uint32_t v = ((uint32_t)s[i] << 16) | ((uint32_t)s[i + 1] << 8) | s[i + 2];
            *o++ = b64_alphabet[(v >> 18) & 63];
            *o++ = b64_alphabet[(v >> 12) & 63];
            *o++ = b64_alphabet[(v >> 6) & 63];
            *o++ = b64_alphabet[v & 63];
        }
        if (i < n) {
            uint32_t v = (uint32_t)s[i] << 16;
            if (i + 1 < n) {
                v |= (uint32_t)s[i + 1] << 8;
            }
            *o++ = b64_alphabet[(v >> 18) & 63];
            *o++ = b64_alphabet[(v >> 12) & 63];
            *o++ = i + 1 < n ? b64_alphabet[(v >> 6) & 63] : '=';
            *o++ = '=';
        }
        memcpy(o, "\"}", 2);
        o += 2;
        b->len = (size_t)(o - b->data);
        return 1;
    }
    /* At most 6 bytes per input byte (\u00XX), plus the quotes. */
    if (!out_reserve(b, (size_t)n * 6 + 2)) {
        return 0;
    }
    o = b->data + b->len;
    *o++ = '"';
    for (i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"':
        case '\\':
            *o++ = (char)c;
            break;
        case '\b':
            *o++ = 'b';
            break;
        case '\f':
            *o++ = 'f';
            break;
        case '\n':
            *o++ = 'n';
            break;
        case '\r':
            *o++ = 'r';
            break;
        case '\t':
            *o++ = 't';
            break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = "0123456789abcdef"[c >> 4];
            *o++ = "0123456789abcdef"[c & 15];
        }
    }
    *o++ = '"';
    b->len = (size_t)(o - b->data);
    return 1;
}

/* One event payload's fields 4.. (numbers 4 + index into `codes`), canonical only: every
 * known field with its own wire type (varint for numbers, length-delimited for strings), a
 * uint32 that fits 32 bits, no groups; the last occurrence of a scalar wins and `args`
 * collects every occurrence (offsets into `args_at`, a list the caller frees with
 * PyMem_RawFree).  Fields 1..3 (job_uuid bytes, timestamp, sequence) are checked and ignored.
 * 0 for anything else: the caller then takes the protobuf route, which decides; -1 when out
 * of memory, with no exception set (it runs without the GIL). */
typedef struct {
    int64_t timestamp;
    uint64_t sequence;
    uint64_t number[EV_MAX_FIELDS];
    const unsigned char *text[EV_MAX_FIELDS];
    Py_ssize_t text_len[EV_MAX_FIELDS];
} EventValues;

static int
parse_event(const unsigned char *p, const unsigned char *end, const int *codes, int nfields,
            EventValues *v, const unsigned char ***args_at, Py_ssize_t *nargs,
            Py_ssize_t *args_room)
{
    uint64_t value;
    Py_ssize_t size;
    memset(v, 0, sizeof(*v));
    *nargs = 0;
    while (p < end) {
        uint32_t field, wire;
        if (!read_tag(&p, end, &field, &wire)) {
            return 0;
        }
        if (field == 1) {
            if (wire != 2 || !read_size(&p, end, &size)) {
                return 0;
            }
            p += size;
        }
        else if (field == 2 || field == 3) {
            if (wire != 0 || !read_varint(&p, end, 10, &value)) {
                return 0;
            }
            if (field == 2) {
                v->timestamp = (int64_t)value;
            }
            else {
                v->sequence = value;
            }
        }
        else if (field >= 4 && field < 4 + (uint32_t)nfields) {
            int i = (int)field - 4;
            int code = codes[i];
            if (code == EV_STR || code == EV_STRS) {
                if (wire != 2 || !read_size(&p, end, &size)) {
                    return 0;
                }
                if (code == EV_STR) {
                    v->text[i] = p;
                    v->text_len[i] = size;
                }
                else {
                    /* Pairs of (start, end) pointers. */
                    if (*nargs + 2 > *args_room) {
                        Py_ssize_t room = *args_room ? *args_room * 2 : 64;
                        const unsigned char **grown = PyMem_RawRealloc(
                            (void *)*args_at, (size_t)room * sizeof(**args_at));
                        if (grown == NULL) {
                            return -1; /* out of memory; the caller sets the exception */
                        }
                        *args_at = grown;
                        *args_room = room;
                    }
                    (*args_at)[(*nargs)++] = p;
                    (*args_at)[(*nargs)++] = p + size;
                }
                p += size;
            }
            else {
                if (wire != 0 || !read_varint(&p, end, 10, &value)) {
                    return 0;
                }
                if (code == EV_U32 && value > UINT32_MAX) {
                    return 0;
                }
                v->number[i] = value;
            }
        }
        else if (wire == 3 || wire == 4 || !skip_field(&p, end, wire)) {
            return 0;
        }
    }
    return 1;
}

/* The field codes of the event payloads of types 3..9 (events.py's kinds table), from field
 * number 4 on; -1 ends a layout. */
static const int event_layouts[7][EV_MAX_FIELDS] = {
    /* 3 exec */ {EV_U32, EV_U32, EV_U32, EV_U32, EV_STR, EV_STR, EV_STRS, -1},
    /* 4 connect */ {EV_U32, EV_STR, EV_STR, EV_U32, EV_STR, EV_U32, EV_STR, -1},
    /* 5 accept */ {EV_U32, EV_STR, EV_STR, EV_U32, EV_STR, EV_U32, EV_STR, -1},
    /* 6 socket data */ {EV_U32, EV_STR, EV_STR, EV_STR, EV_U32, EV_STR, EV_I64, -1},
    /* 7 mmap */ {EV_U32, EV_STR, EV_U64, EV_U64, EV_U32, EV_U32, EV_STR, -1},
    /* 8 mprotect */ {EV_U32, EV_STR, EV_U64, EV_U64, EV_U32, -1},
    /* 9 file */ {EV_U32, EV_STR, EV_STR, EV_STR, EV_I64, -1},
};

static int
other_payload_time(uint32_t type, const Envelope *env, int64_t *ts, uint64_t *seq)
{
    const unsigned char *p = env->data, *end = env->data_end;
    if (type == 2) {
        MetricValues m;
        if (!parse_metric(p, end, &m)) {
            return 0;
        }
        /* The payload's time, or the envelope's when the payload's timestamp is 0. */
        if (m.timestamp != 0) {
            *ts = m.timestamp;
            *seq = m.sequence;
        }
        else {
            *ts = env->timestamp;
            *seq = env->sequence;
        }
        return 1;
    }
    else {
        const int *codes = event_layouts[type - 3];
        int nfields = 0, ok;
        EventValues v;
        const unsigned char **args_at = NULL;
        Py_ssize_t nargs = 0, args_room = 0;
        while (nfields < EV_MAX_FIELDS && codes[nfields] >= 0) {
            nfields++;
        }
        ok = parse_event(p, end, codes, nfields, &v, &args_at, &nargs, &args_room);
        PyMem_RawFree((void *)args_at);
        if (ok < 0) {
            PyErr_NoMemory();
        }
        if (ok <= 0) {
            return ok;
        }
        /* The envelope's time, or the payload's when the envelope's timestamp is 0. */
        if (env->timestamp != 0) {
            *ts = env->timestamp;
            *seq = env->sequence;
        }
        else {
            *ts = v.timestamp;
            *seq = v.sequence;
        }
        return 1;
    }
}

PyDoc_STRVAR(event_json_lines_doc,
"event_json_lines(layout, job_json, payloads, timestamps, sequences) -> list\n\n"
"The stored JSON lines (events.payload_json_line) of a batch of event payloads of one kind.\n"
"`layout` is a tuple of (prefix: bytes, code: int) per field from number 4 on, the prefix\n"
"being ',\"key\":' and the code 0 uint32, 1 uint64, 2 int64, 3 string, 4 repeated string;\n"
"`job_json` the job id as a JSON string; `timestamps` and `sequences` the values to write\n"
"(lists of ints, or packed columns: array('q') and array('Q')).\n"
"A list of the same length as `payloads` whose items are the line, or None where the\n"
"payload is not canonical or a value does not fit (the caller takes the protobuf route for\n"
"those).  Pool thread: for a batch of at least 256 payloads, the payloads are parsed and\n"
"the lines written without the GIL.");

static PyObject *
event_json_lines(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *layout, *timestamps, *sequences, *out = NULL;
    const char *prefix[EV_MAX_FIELDS];
    Py_ssize_t prefix_len[EV_MAX_FIELDS];
    int codes[EV_MAX_FIELDS];
    int nfields, f, failed = 0;
    const char *job;
    Py_ssize_t job_len, i, n, nargs_seen = 0, args_room = 0;
    const unsigned char **args_at = NULL;
    Payloads p = {NULL, NULL, NULL, NULL};
    const unsigned char **ptr;
    Py_ssize_t *len, *start;
    int64_t *tss = NULL;
    uint64_t *seqs = NULL;
    int packed_ts, packed_seq;
    OutBuf b = {NULL, 0, 0};
    PyThreadState *save = NULL;

    (void)self;
    if (nargs != 5 || !PyTuple_Check(args[0]) || !PyUnicode_Check(args[1])
        || !PyList_Check(args[2]) || !(PyList_Check(args[3]) || PyObject_CheckBuffer(args[3]))
        || !(PyList_Check(args[4]) || PyObject_CheckBuffer(args[4]))) {
        PyErr_SetString(PyExc_TypeError,
                        "event_json_lines(layout: tuple, job_json: str, payloads: list, "
                        "timestamps: list or array('q'), sequences: list or array('Q'))");
        return NULL;
    }
    layout = args[0];
    timestamps = args[3];
    sequences = args[4];
    n = PyList_GET_SIZE(args[2]);
    {
        Py_ssize_t nts = column_size(timestamps), nseq = column_size(sequences);
        if (nts < 0 || nseq < 0) {
            return NULL;
        }
        if (nts != n || nseq != n) {
            PyErr_SetString(PyExc_ValueError, "event_json_lines: column lengths differ");
            return NULL;
        }
    }
    nfields = (int)PyTuple_GET_SIZE(layout);
    if (nfields > EV_MAX_FIELDS) {
        PyErr_SetString(PyExc_ValueError, "event_json_lines: too many fields");
        return NULL;
    }
    for (f = 0; f < nfields; f++) {
        PyObject *item = PyTuple_GET_ITEM(layout, f);
        long code;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2
            || !PyBytes_Check(PyTuple_GET_ITEM(item, 0))) {
            PyErr_SetString(PyExc_TypeError, "event_json_lines: layout items are (bytes, int)");
            return NULL;
        }
        code = PyLong_AsLong(PyTuple_GET_ITEM(item, 1));
        if (code == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (code < EV_U32 || code > EV_STRS) {
            PyErr_SetString(PyExc_ValueError, "event_json_lines: unknown field code");
            return NULL;
        }
        codes[f] = (int)code;
        prefix[f] = PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 0));
        prefix_len[f] = PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 0));
    }
    job = PyUnicode_AsUTF8AndSize(args[1], &job_len);
    if (job == NULL) {
        return NULL;
    }
    /* With the GIL: a snapshot of the inputs (Payloads, and the envelope columns in C
     * arrays); a payload whose timestamp or sequence is out of range is left to Python too. */
    if (payloads_take(args[2], &p) < 0) {
        goto done;
    }
    ptr = p.ptr;
    len = p.len;
    start = p.start;
    tss = PyMem_RawMalloc(sizeof(*tss) * (size_t)(n + 1));
    seqs = PyMem_RawMalloc(sizeof(*seqs) * (size_t)(n + 1));
    if (tss == NULL || seqs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    packed_ts = take_int_column(timestamps, n, 0, tss);
    packed_seq = packed_ts == -1 ? -1 : take_int_column(sequences, n, 1, seqs);
    if (packed_seq == -1) {
        goto done;
    }
    if (packed_ts == -2 || packed_seq == -2) {
        PyErr_SetString(PyExc_TypeError,
                        "event_json_lines: timestamps must be a list or array('q'), sequences "
                        "a list or array('Q')");
        goto done;
    }
    for (i = 0; i < n; i++) {
        if (start[i] < 0) {
            continue;
        }
        if (!packed_ts) {
            tss[i] = as_i64(PyList_GET_ITEM(timestamps, i));
            if (tss[i] == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                start[i] = -1;
                continue;
            }
        }
        if (!packed_seq) {
            seqs[i] = as_u64(PyList_GET_ITEM(sequences, i));
            if (seqs[i] == (uint64_t)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                start[i] = -1;
            }
        }
    }

    /* Without the GIL (for a batch worth handing it over): every line into one buffer;
     * line i is [start[i], start[i + 1]). */
    if (n >= JP_RELEASE_LINES) {
        save = PyEval_SaveThread();
    }
    for (i = 0; i < n && !failed; i++) {
        EventValues v;
        char num[96]; /* ,"timestamp":<20 characters>,"sequence":<20 digits> */
        int nlen, ok;
        if (start[i] < 0) {
            continue;
        }
        start[i] = (Py_ssize_t)b.len;
        ok = parse_event(ptr[i], ptr[i] + len[i], codes, nfields, &v, &args_at, &nargs_seen,
                         &args_room);
        if (ok < 0) {
            failed = 1;
            break;
        }
        if (!ok) {
            start[i] = -1;
            continue;
        }
        if (!out_put(&b, "{\"job_uuid\":", 12) || !out_put(&b, job, (size_t)job_len)) {
            failed = 1;
            break;
        }
        {
            char *o = PUT_LITERAL(num, ",\"timestamp\":");
            o = put_i64_text(o, tss[i]);
            o = PUT_LITERAL(o, ",\"sequence\":");
            o = put_u64_text(o, seqs[i]);
            if (!out_put(&b, num, (size_t)(o - num))) {
                failed = 1;
                break;
            }
        }
        for (f = 0; f < nfields; f++) {
            if (!out_put(&b, prefix[f], (size_t)prefix_len[f])) {
                failed = 1;
                break;
            }
            switch (codes[f]) {
            case EV_U32:
            case EV_U64:
                nlen = (int)(put_u64_text(num, v.number[f]) - num);
                break;
            case EV_I64:
                nlen = (int)(put_i64_text(num, (int64_t)v.number[f]) - num);
                break;
            case EV_STR:
                nlen = -1;
                if (!out_text(&b, v.text[f] ? v.text[f] : (const unsigned char *)"",
                              v.text_len[f])) {
                    failed = 1;
                }
                break;
            default: {
                Py_ssize_t k;
                nlen = -1;
                if (!out_put(&b, "[", 1)) {
                    failed = 1;
                    break;
                }
                for (k = 0; k < nargs_seen && !failed; k += 2) {
                    if ((k && !out_put(&b, ",", 1))
                        || !out_text(&b, args_at[k], args_at[k + 1] - args_at[k])) {
                        failed = 1;
                    }
                }
                if (!failed && !out_put(&b, "]", 1)) {
                    failed = 1;
                }
            }
            }
            if (failed || (nlen >= 0 && !out_put(&b, num, (size_t)nlen))) {
                failed = 1;
                break;
            }
        }
        if (!failed && !out_put(&b, "}\n", 2)) {
            failed = 1;
        }
    }
    out = lines_list(save, failed, b.data, (Py_ssize_t)b.len, start, n);

done:
    PyMem_RawFree(b.data);
    PyMem_RawFree((void *)args_at);
    PyMem_RawFree(tss);
    PyMem_RawFree(seqs);
    payloads_free(&p);
    return out;
}

/* ---- metric_columns: numeric columns of stored metric JSON lines (storage/metric_columns.py) -- */

/* Field codes: the order of storage/metric_columns.FIELDS. */
enum {
    MC_CPU, MC_MEMORY, MC_GPU,
    MC_READ_BYTES, MC_WRITE_BYTES, MC_READ_OPS, MC_WRITE_OPS,
    MC_RX_BYTES, MC_TX_BYTES, MC_RX_PACKETS, MC_TX_PACKETS,
    MC_FIELDS
};

/* How deep a value the scanner skips may nest before it defers (json's own limit is the
 * interpreter's recursion limit, whose error is not a ValueError: the Python route decides). */
#define MC_MAX_DEPTH 64

typedef struct {
    const unsigned char *p; /* the number's text in the data */
    uint32_t n;             /* its length */
    uint32_t is_float;      /* a fraction or an exponent: json.loads gives a float */
} NumTok;

static inline const unsigned char *
mc_ws(const unsigned char *p, const unsigned char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) {
        p++;
    }
    return p;
}

static inline int
mc_hex(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* A JSON string at *pp (which points at its opening quote), as json.loads accepts it (strict:
 * no control characters), ASCII only (any other byte defers, so that UTF-8 validity is never
 * this code's question).  *escaped: 0 without escapes, 2 with a \uXXXX escape of a lower-case
 * letter or '_' (which may spell a key we look for), 1 with other escapes only (they stand for
 * characters that no key we look for holds, so the raw text decides).  0: defer. */
static int
mc_string(const unsigned char **pp, const unsigned char *end, int *escaped)
{
    const unsigned char *p = *pp + 1;
    *escaped = 0;
    while (p < end) {
        unsigned char c = *p;
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            p++; /* the common case first */
            continue;
        }
        if (c == '"') {
            *pp = p + 1;
            return 1;
        }
        if (c < 0x20 || c >= 0x80) {
            return 0;
        }
        if (c == '\\') {
            if (*escaped == 0) {
                *escaped = 1;
            }
            if (++p >= end) {
                return 0;
            }
            c = *p;
            if (c == 'u') {
                unsigned code = 0;
                int k;
                if (end - p < 5 || !mc_hex(p[1]) || !mc_hex(p[2]) || !mc_hex(p[3])
                    || !mc_hex(p[4])) {
                    return 0;
                }
                for (k = 1; k <= 4; k++) {
                    unsigned char h = p[k];
                    code = code * 16 + (h <= '9' ? h - '0' : (h | 0x20) - 'a' + 10);
                }
                if ((code >= 'a' && code <= 'z') || code == '_') {
                    *escaped = 2; /* may spell a key we look for */
                }
                p += 4;
            }
            else if (c != '"' && c != '\\' && c != '/' && c != 'b' && c != 'f' && c != 'n'
                     && c != 'r' && c != 't') {
                return 0;
            }
        }
        p++;
    }
    return 0;
}

/* A JSON number at *pp, json's grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?
 * (NaN and the infinities, which json also reads, defer).  0: defer. */
static int
mc_number(const unsigned char **pp, const unsigned char *end, NumTok *tok)
{
    const unsigned char *p = *pp, *start = *pp;
    int is_float = 0;
    if (p < end && *p == '-') {
        p++;
    }
    if (p >= end) {
        return 0;
    }
    if (*p == '0') {
        p++;
    }
    else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
    }
    else {
        return 0;
    }
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9') {
            return 0;
        }
        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
        is_float = 1;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) {
            p++;
        }
        if (p >= end || *p < '0' || *p > '9') {
            return 0;
        }
        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
        is_float = 1;
    }
    if (p - start > 0x7fffffff) {
        return 0;
    }
    if (tok != NULL) {
        tok->p = start;
        tok->n = (uint32_t)(p - start);
        tok->is_float = (uint32_t)is_float;
    }
    *pp = p;
    return 1;
}

static int mc_skip_value(const unsigned char **pp, const unsigned char *end, int depth);

/* A member's value handler for mc_object: the value of key [key, key + klen) is at *pp
 * (no leading whitespace); it moves *pp past the value.  0: defer. */
typedef int (*mc_member_fn)(const unsigned char *key, Py_ssize_t klen,
                            const unsigned char **pp, const unsigned char *end, void *ctx);

/* The members of an object whose '{' is at *pp, each value handed to `member` with its key;
 * on success *pp is past the '}'.  Unless `any_keys`, a key holding a \uXXXX escape that may
 * spell a wanted key defers.  0: defer. */
static int
mc_object(const unsigned char **pp, const unsigned char *end, int any_keys, mc_member_fn member,
          void *ctx)
{
    const unsigned char *p, *key;
    int escaped;
    if (*pp >= end || **pp != '{') {
        return 0;
    }
    p = mc_ws(*pp + 1, end);
    if (p < end && *p == '}') {
        *pp = p + 1;
        return 1;
    }
    for (;;) {
        if (p >= end || *p != '"') {
            return 0;
        }
        key = p + 1;
        if (!mc_string(&p, end, &escaped) || (escaped == 2 && !any_keys)) {
            return 0;
        }
        Py_ssize_t klen = p - 1 - key;
        p = mc_ws(p, end);
        if (p >= end || *p != ':') {
            return 0;
        }
        p = mc_ws(p + 1, end);
        if (!member(key, klen, &p, end, ctx)) {
            return 0;
        }
        p = mc_ws(p, end);
        if (p < end && *p == ',') {
            p = mc_ws(p + 1, end);
            continue;
        }
        if (p < end && *p == '}') {
            *pp = p + 1;
            return 1;
        }
        return 0;
    }
}

static int
mc_skip_member(const unsigned char *key, Py_ssize_t klen, const unsigned char **pp,
               const unsigned char *end, void *ctx)
{
    (void)key;
    (void)klen;
    return mc_skip_value(pp, end, *(const int *)ctx + 1);
}

/* The members of an object whose '{' is at *pp, each value skipped.  0: defer. */
static int
mc_skip_object(const unsigned char **pp, const unsigned char *end, int depth)
{
    return mc_object(pp, end, 1, mc_skip_member, &depth);
}

static int
mc_skip_array(const unsigned char **pp, const unsigned char *end, int depth)
{
    const unsigned char *p = mc_ws(*pp + 1, end);
    if (p < end && *p == ']') {
        *pp = p + 1;
        return 1;
    }
    for (;;) {
        if (!mc_skip_value(&p, end, depth + 1)) {
            return 0;
        }
        p = mc_ws(p, end);
        if (p < end && *p == ',') {
            p = mc_ws(p + 1, end);
            continue;
        }
        if (p < end && *p == ']') {
            *pp = p + 1;
            return 1;
        }
        return 0;
    }
}

static int
mc_literal(const unsigned char **pp, const unsigned char *end, const char *word, size_t n)
{
    if ((size_t)(end - *pp) < n || memcmp(*pp, word, n) != 0) {
        return 0;
    }
    *pp += n;
    return 1;
}

/* Any JSON value at *pp (no leading whitespace), checked as json.loads checks it.  0: defer. */
static int
mc_skip_value(const unsigned char **pp, const unsigned char *end, int depth)
{
    int escaped;
    if (*pp >= end || depth > MC_MAX_DEPTH) {
        return 0;
    }
    switch (**pp) {
    case '"':
        return mc_string(pp, end, &escaped);
    case '{':
        return mc_skip_object(pp, end, depth);
    case '[':
        return mc_skip_array(pp, end, depth);
    case 't':
        return mc_literal(pp, end, "true", 4);
    case 'f':
        return mc_literal(pp, end, "false", 5);
    case 'n':
        return mc_literal(pp, end, "null", 4);
    default:
        return mc_number(pp, end, NULL);
    }
}

static inline int
mc_key_is(const unsigned char *key, Py_ssize_t n, const char *name)
{
    return (size_t)n == strlen(name) && memcmp(key, name, (size_t)n) == 0;
}

/* What the handlers below fill: numbers by field code, and which codes were seen. */
typedef struct {
    NumTok *toks;
    unsigned *seen;
} McOut;

/* A numeric field's value at *pp into out->toks[code]; a code seen before defers. */
static int
mc_take_number(const unsigned char **pp, const unsigned char *end, McOut *out, int code)
{
    if (*out->seen & (1u << code) || !mc_number(pp, end, &out->toks[code])) {
        return 0;
    }
    *out->seen |= 1u << code;
    return 1;
}

/* The members of an object of numeric fields: `names[i]` goes to toks[codes[i]]; other keys
 * are skipped at `depth`. */
typedef struct {
    McOut *out;
    const char *const *names;
    const int *codes;
    int count;
    int depth;
} McFields;

static int
mc_field_member(const unsigned char *key, Py_ssize_t klen, const unsigned char **pp,
                const unsigned char *end, void *ctx)
{
    McFields *f = ctx;
    int i;
    for (i = 0; i < f->count; i++) {
        if (mc_key_is(key, klen, f->names[i])) {
            return mc_take_number(pp, end, f->out, f->codes[i]);
        }
    }
    return mc_skip_value(pp, end, f->depth + 1);
}

/* An object of numeric fields at *pp ('{'): `names[i]` goes to toks[codes[i]]; other keys are
 * skipped.  A known key twice, a key holding a unicode escape or a known key whose value is not a number
 * defers.  0: defer. */
static int
mc_fields(const unsigned char **pp, const unsigned char *end, const char *const *names,
          const int *codes, int count, McOut *out, int depth)
{
    McFields f = {out, names, codes, count, depth};
    return mc_object(pp, end, 0, mc_field_member, &f);
}

static const char *const mc_disk_names[] = {"read_bytes", "write_bytes", "read_ops", "write_ops"};
static const int mc_disk_codes[] = {MC_READ_BYTES, MC_WRITE_BYTES, MC_READ_OPS, MC_WRITE_OPS};
static const char *const mc_net_names[] = {"rx_bytes", "tx_bytes", "rx_packets", "tx_packets"};
static const int mc_net_codes[] = {MC_RX_BYTES, MC_TX_BYTES, MC_RX_PACKETS, MC_TX_PACKETS};
static const char *const mc_top_names[] = {"cpu_usage", "memory_usage", "gpu_usage"};
static const int mc_top_codes[] = {MC_CPU, MC_MEMORY, MC_GPU};

/* The `data` object's members: the two counter objects once each, the top-level fields. */
typedef struct {
    McOut *out;
    int disk, net;
} McData;

static int
mc_data_member(const unsigned char *key, Py_ssize_t klen, const unsigned char **pp,
               const unsigned char *end, void *ctx)
{
    McData *d = ctx;
    if (mc_key_is(key, klen, "disk_io")) {
        return !d->disk++ && mc_fields(pp, end, mc_disk_names, mc_disk_codes, 4, d->out, 2);
    }
    if (mc_key_is(key, klen, "network_io")) {
        return !d->net++ && mc_fields(pp, end, mc_net_names, mc_net_codes, 4, d->out, 2);
    }
    McFields top = {d->out, mc_top_names, mc_top_codes, 3, 1};
    return mc_field_member(key, klen, pp, end, &top);
}

/* The line's members: one `data` object, the rest skipped. */
typedef struct {
    McOut *out;
    int data;
} McLine;

static int
mc_line_member(const unsigned char *key, Py_ssize_t klen, const unsigned char **pp,
               const unsigned char *end, void *ctx)
{
    McLine *l = ctx;
    if (mc_key_is(key, klen, "data")) {
        McData d = {l->out, 0, 0};
        return !l->data++ && mc_object(pp, end, 0, mc_data_member, &d);
    }
    return mc_skip_value(pp, end, 1);
}

/* One stored line [p, end): a JSON object (whitespace around it) with one `data` object.
 * Fills toks (indexed by field code) and *seen.  0: defer. */
static int
mc_line(const unsigned char *p, const unsigned char *end, NumTok *toks, unsigned *seen)
{
    McOut out = {toks, seen};
    McLine line = {&out, 0};
    *seen = 0;
    p = mc_ws(p, end);
    if (!mc_object(&p, end, 0, mc_line_member, &line)) {
        return 0;
    }
    return line.data && mc_ws(p, end) == end;
}

static const double mc_pow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                  1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                  1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* A float token's value when it is exact to compute in one IEEE operation (Clinger's fast
 * path: at most 15 digits, so the digits are an exact double, and a power of ten up to 1e22,
 * which is exact too; one multiplication or division is then correctly rounded, the value
 * float() gives).  0 for anything else (the caller then parses the text as float() does). */
static inline int
mc_fast_double(const NumTok *tok, double *out)
{
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0
    (void)tok;
    (void)out;
    return 0; /* extended-precision arithmetic would round twice */
#endif
    const unsigned char *p = tok->p, *end = tok->p + tok->n;
    int64_t mantissa = 0, exponent = 0;
    int digits = 0, neg = 0, scale = 0;
    if (*p == '-') {
        neg = 1;
        p++;
    }
    for (; p < end && *p >= '0' && *p <= '9'; p++) {
        mantissa = mantissa * 10 + (*p - '0');
        if (++digits > 15) {
            return 0;
        }
    }
    if (p < end && *p == '.') {
        for (p++; p < end && *p >= '0' && *p <= '9'; p++) {
            mantissa = mantissa * 10 + (*p - '0');
            scale--;
            if (++digits > 15) {
                return 0;
            }
        }
    }
    if (p < end) { /* the exponent */
        int eneg = 0;
        p++;
        if (*p == '+' || *p == '-') {
            eneg = *p == '-';
            p++;
        }
        if (end - p > 4) {
            return 0;
        }
        for (; p < end; p++) {
            exponent = exponent * 10 + (*p - '0');
        }
        if (eneg) {
            exponent = -exponent;
        }
    }
    exponent += scale;
    if (exponent < -22 || exponent > 22) {
        return 0;
    }
    *out = exponent >= 0 ? (double)mantissa * mc_pow10[exponent]
                         : (double)mantissa / mc_pow10[-exponent];
    if (neg) {
        *out = -*out;
    }
    return 1;
}

/* The Python value of a number token as the aggregation reads the field (aggregate.py's
 * getters over json.loads' value): float fields take float(value), integer fields int(value);
 * a value those conversions reject (OverflowError) reads as 0.  NULL with no exception set:
 * defer (an integer json.loads itself would refuse, e.g. past int's digit limit).  NULL with
 * an exception: a real error. */
static PyObject *
mc_value(const NumTok *tok, int is_float_field)
{
    char small[64], *text;
    PyObject *result = NULL;
    uint32_t i;
    int neg = tok->p[0] == '-';
    if (!tok->is_float && tok->n - (uint32_t)neg <= 15) {
        /* At most 15 digits: exact as a long long and as a double. */
        long long v = 0;
        for (i = (uint32_t)neg; i < tok->n; i++) {
            v = v * 10 + (tok->p[i] - '0');
        }
        if (neg) {
            v = -v;
        }
        if (is_float_field) {
            return PyFloat_FromDouble((double)v);
        }
        return PyLong_FromLongLong(v);
    }
    if (tok->is_float) {
        double d;
        if (mc_fast_double(tok, &d)) {
            if (is_float_field) {
                return PyFloat_FromDouble(d);
            }
            return isfinite(d) ? PyLong_FromDouble(d) : PyLong_FromLong(0);
        }
    }
    text = tok->n < sizeof(small) ? small : PyMem_Malloc((size_t)tok->n + 1);
    if (text == NULL) {
        return PyErr_NoMemory();
    }
    memcpy(text, tok->p, tok->n);
    text[tok->n] = '\0';
    if (tok->is_float) {
        double d = PyOS_string_to_double(text, NULL, NULL);
        if (d == -1.0 && PyErr_Occurred()) {
            goto done;
        }
        if (is_float_field) {
            result = PyFloat_FromDouble(d);
        }
        else if (isfinite(d)) {
            result = PyLong_FromDouble(d);
        }
        else {
            result = PyLong_FromLong(0);
        }
    }
    else {
        PyObject *number = PyLong_FromString(text, NULL, 10);
        if (number == NULL) {
            if (PyErr_ExceptionMatches(PyExc_ValueError)) {
                PyErr_Clear(); /* past the digit limit: json.loads refuses it too */
            }
            goto done;
        }
        if (!is_float_field) {
            result = number;
            goto done;
        }
        double d = PyLong_AsDouble(number);
        Py_DECREF(number);
        if (d == -1.0 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                goto done;
            }
            PyErr_Clear();
            d = 0.0;
        }
        result = PyFloat_FromDouble(d);
    }
done:
    if (text != small) {
        PyMem_Free(text);
    }
    return result;
}

PyDoc_STRVAR(metric_columns_doc,
"metric_columns(data, lengths, lo, hi, fields) -> list of lists, or None\n\n"
"The values of `fields` (field codes, the positions in storage/metric_columns.FIELDS) of the\n"
"stored metric lines lo..hi-1 of a member: line i is the `lengths[i]` bytes after the lines\n"
"before it in `data`.  One list per field, values as the aggregation reads them from\n"
"json.loads' objects.  None when any line is not in the plain form this scanner reads (the\n"
"caller then takes the json route, which decides).  Scans without the GIL.  Pool thread.");

static PyObject *
metric_columns(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t lo, hi, nlen, nfields, i, f, offset = 0, count;
    int codes[MC_FIELDS];
    Py_ssize_t *begins = NULL;
    NumTok *toks = NULL;
    PyObject *fields, *lengths, *out = NULL;
    int ok = 1;
    unsigned want_mask = 0;

    (void)self;
    if (nargs != 5 || !PyList_Check(args[1]) || !PyTuple_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "metric_columns(data, lengths: list, lo: int, hi: int, fields: tuple)");
        return NULL;
    }
    lengths = args[1];
    fields = args[4];
    lo = PyLong_AsSsize_t(args[2]);
    hi = PyLong_AsSsize_t(args[3]);
    if ((lo == -1 || hi == -1) && PyErr_Occurred()) {
        return NULL;
    }
    nlen = PyList_GET_SIZE(lengths);
    nfields = PyTuple_GET_SIZE(fields);
    if (lo < 0 || hi < lo || hi > nlen || nfields > MC_FIELDS) {
        PyErr_SetString(PyExc_ValueError, "metric_columns: lo/hi or fields out of range");
        return NULL;
    }
    for (f = 0; f < nfields; f++) {
        long code = PyLong_AsLong(PyTuple_GET_ITEM(fields, f));
        if (code == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (code < 0 || code >= MC_FIELDS) {
            PyErr_SetString(PyExc_ValueError, "metric_columns: unknown field code");
            return NULL;
        }
        codes[f] = (int)code;
        want_mask |= 1u << code;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    count = hi - lo;
    begins = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(count + 1));
    toks = PyMem_Malloc(sizeof(NumTok) * (size_t)(count * MC_FIELDS + 1));
    if (begins == NULL || toks == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (i = 0; i < hi; i++) {
        Py_ssize_t n = PyLong_AsSsize_t(PyList_GET_ITEM(lengths, i));
        if (n == -1 && PyErr_Occurred()) {
            goto fail;
        }
        if (n < 0 || n > view.len - offset) {
            ok = 0; /* past the data: the json route reports it */
            break;
        }
        if (i >= lo) {
            begins[i - lo] = offset;
        }
        offset += n;
    }
    if (ok) {
        begins[count] = offset;
        const unsigned char *base = (const unsigned char *)view.buf;
        Py_BEGIN_ALLOW_THREADS
        for (i = 0; i < count; i++) {
            unsigned seen;
            if (!mc_line(base + begins[i], base + begins[i + 1], toks + i * MC_FIELDS, &seen)
                || (seen & want_mask) != want_mask) {
                ok = 0;
                break;
            }
        }
        Py_END_ALLOW_THREADS
    }
    if (!ok) {
        PyMem_Free(begins);
        PyMem_Free(toks);
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    out = PyList_New(nfields);
    if (out == NULL) {
        goto fail;
    }
    for (f = 0; f < nfields; f++) {
        int code = codes[f];
        int is_float = code == MC_CPU || code == MC_GPU;
        PyObject *column = PyList_New(count);
        if (column == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(out, f, column);
        for (i = 0; i < count; i++) {
            PyObject *value = mc_value(&toks[i * MC_FIELDS + code], is_float);
            if (value == NULL) {
                if (PyErr_Occurred()) {
                    goto fail;
                }
                Py_CLEAR(out);
                PyMem_Free(begins);
                PyMem_Free(toks);
                PyBuffer_Release(&view);
                Py_RETURN_NONE;
            }
            PyList_SET_ITEM(column, i, value);
        }
    }
    PyMem_Free(begins);
    PyMem_Free(toks);
    PyBuffer_Release(&view);
    return out;

fail:
    Py_XDECREF(out);
    PyMem_Free(begins);
    PyMem_Free(toks);
    PyBuffer_Release(&view);
    return NULL;
}

/* ---- message_ends: how a member's messages end (storage/search.py) ------------------------ */

PyDoc_STRVAR(message_ends_doc,
"message_ends(data, lengths) -> (total, nonempty, lines)\n\n"
"`total` = sum(lengths); `nonempty`: every length is > 0; `lines`: there is a message, every\n"
"one is non-empty, the lengths add up to len(data), and each message (the `lengths[i]` bytes\n"
"after the ones before it) ends in a newline.  storage/search.py's _message_ends_py is the\n"
"reference.  Any thread.");

static PyObject *
message_ends(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    PyObject *lengths;
    Py_ssize_t n, i, total = 0, end = 0;
    int nonempty = 1, lines;
    const unsigned char *base;

    (void)self;
    if (nargs != 2 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "message_ends(data, lengths: list)");
        return NULL;
    }
    lengths = args[1];
    n = PyList_GET_SIZE(lengths);
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    base = (const unsigned char *)view.buf;
    lines = n > 0;
    for (i = 0; i < n; i++) {
        Py_ssize_t len = PyLong_AsSsize_t(PyList_GET_ITEM(lengths, i));
        if (len == -1 && PyErr_Occurred()) {
            PyBuffer_Release(&view);
            return NULL;
        }
        if (len < 0 || len > PY_SSIZE_T_MAX - total) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_ValueError, "message_ends: a length is negative or too large");
            return NULL;
        }
        total += len;
        if (len == 0) {
            nonempty = 0;
            lines = 0;
        }
        end = total;
        if (lines && (end > view.len || base[end - 1] != '\n')) {
            lines = 0;
        }
    }
    if (total != view.len) {
        lines = 0;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nNN)", total, PyBool_FromLong(nonempty), PyBool_FromLong(lines));
}

/* -- append_at: the write path's append to an existing segment, without the GIL ----------- */

/* 0: appended; 1: not this route (nothing written: the caller walks the path, which decides);
 * -1: a write, truncation or fsync failed with *err (what was written is cut back first). */
static int
append_at_nogil(const char *path, struct iovec *iov, Py_ssize_t n, long long expected,
                int do_fsync, int *err)
{
    char proc[64];
    char link[4096];
    struct stat st;
    ssize_t len;
    off_t offset = (off_t)expected;
    Py_ssize_t i = 0;
    int fd = open(path, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);

    if (fd < 0) {
        return 1;
    }
    /* The descriptor must have reached `path` itself: a symlink anywhere on the way resolves
     * to another name (the same check as safefs.open_read). */
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    len = readlink(proc, link, sizeof link);
    if (len < 0 || (size_t)len >= sizeof link || (size_t)len != strlen(path)
        || memcmp(link, path, (size_t)len) != 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)
        || st.st_size < (off_t)expected) {
        close(fd);
        return 1;
    }
    if (st.st_size > (off_t)expected && ftruncate(fd, (off_t)expected) != 0) {
        goto failed;
    }
    while (i < n) {
        ssize_t w;
        int count = n - i > IOV_MAX ? IOV_MAX : (int)(n - i);
        if (iov[i].iov_len == 0) {
            i++;
            continue;
        }
        w = pwritev(fd, iov + i, count, offset);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            goto failed;
        }
        if (w == 0) {
            errno = EIO;
            goto failed;
        }
        offset += w;
        while (w > 0 && i < n) {
            if ((size_t)w >= iov[i].iov_len) {
                w -= (ssize_t)iov[i].iov_len;
                i++;
            }
            else {
                iov[i].iov_base = (char *)iov[i].iov_base + w;
                iov[i].iov_len -= (size_t)w;
                w = 0;
            }
        }
    }
    if (do_fsync) {
        while (fsync(fd) != 0) {
            if (errno != EINTR) {
                goto failed;
            }
        }
    }
    if (close(fd) != 0 && errno != EINTR) {
        *err = errno;
        return -1;
    }
    return 0;
failed:
    *err = errno;
    (void)ftruncate(fd, (off_t)expected);
    close(fd);
    return -1;
}

PyDoc_STRVAR(append_at_doc,
"append_at(path, blobs, expected_size, fsync) -> new size or None\n\n"
"Append the bytes-like ``blobs`` in order at ``expected_size`` of the existing regular file\n"
"``path`` (absolute), cutting back a longer file first, and fsync it when ``fsync``: opened\n"
"with O_NOFOLLOW, and only when /proc/self/fd shows it reached ``path`` itself (no symlink on\n"
"the way).  None, with nothing written, when the file is missing, is not regular, is shorter\n"
"than ``expected_size`` or was reached another way: the caller's walk decides then.  A failed\n"
"write or fsync cuts the file back to ``expected_size`` and raises OSError.  Runs without the\n"
"GIL from the open to the close.  Pool thread.");

static PyObject *
append_at(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *path = NULL, *blobs = NULL, *result = NULL;
    Py_buffer *views = NULL;
    struct iovec *iov = NULL;
    Py_ssize_t n, i, got = 0;
    long long expected, total = 0;
    int do_fsync, status, err = 0;

    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "append_at(path, blobs, expected_size, fsync)");
        return NULL;
    }
    expected = PyLong_AsLongLong(args[2]);
    if (expected == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (expected < 0) {
        PyErr_SetString(PyExc_ValueError, "append_at: expected_size must be >= 0");
        return NULL;
    }
    do_fsync = PyObject_IsTrue(args[3]);
    if (do_fsync < 0 || !PyUnicode_FSConverter(args[0], &path)) {
        return NULL;
    }
    blobs = PySequence_Fast(args[1], "append_at: blobs must be a sequence");
    if (blobs == NULL) {
        goto done;
    }
    n = PySequence_Fast_GET_SIZE(blobs);
    views = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    iov = PyMem_Calloc((size_t)n + 1, sizeof(struct iovec));
    if (views == NULL || iov == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (got = 0; got < n; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(blobs, got), &views[got], PyBUF_SIMPLE)
            < 0) {
            goto done;
        }
        iov[got].iov_base = views[got].buf;
        iov[got].iov_len = (size_t)views[got].len;
        total += views[got].len;
    }
    Py_BEGIN_ALLOW_THREADS
    status = append_at_nogil(PyBytes_AS_STRING(path), iov, n, expected, do_fsync, &err);
    Py_END_ALLOW_THREADS
    if (status == 1) {
        result = Py_NewRef(Py_None);
    }
    else if (status < 0) {
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, args[0]);
    }
    else {
        result = PyLong_FromLongLong(expected + total);
    }
done:
    for (i = 0; i < got; i++) {
        PyBuffer_Release(&views[i]);
    }
    PyMem_Free(views);
    PyMem_Free(iov);
    Py_XDECREF(blobs);
    Py_XDECREF(path);
    return result;
}

/* -- census_groups and extend_groups ----------------------------------------------------------
 *
 * The per-read bookkeeping of the decoder's groups ({(job, code): [timestamps, sequences,
 * arrivals, items]}, code 1/2 a log stream, -t a frame type t): counted and handed to the
 * writer's buffers in one call each, instead of a few Python steps per group.  The
 * pure-Python twins in joblet_persist/grouping.py define the results. */

#define CENSUS_TYPES 10 /* frame types 0..9 */

PyDoc_STRVAR(census_groups_doc,
"census_groups(groups, valid_ids, counts) -> (total, per_type, unknown)\n\
\n\
Count the frames of the decoder's groups: their total, and per frame type (a tuple indexed\n\
by type 0..9: code 1 or 2 is type 1, code -t type t), each type's count also added to the\n\
dict `counts`; `unknown` lists, in order, the keys whose job id is not in `valid_ids`.");

/* 0 when a function `name` that takes `want` positional arguments got `nargs`; else -1 with
 * TypeError set. */
static int
expect_args(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs == want) {
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
    return -1;
}

static PyObject *
census_groups(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *groups, *valid_ids, *counts, *unknown, *key, *value, *per_type, *result;
    Py_ssize_t pos = 0, total = 0, per[CENSUS_TYPES] = {0};
    int t;

    (void)module;
    if (expect_args("census_groups", nargs, 3) < 0) {
        return NULL;
    }
    groups = args[0];
    valid_ids = args[1];
    counts = args[2];
    if (!PyDict_Check(groups) || !PyDict_Check(counts)) {
        PyErr_SetString(PyExc_TypeError, "census_groups() needs dicts of groups and counts");
        return NULL;
    }
    unknown = PyList_New(0);
    if (unknown == NULL) {
        return NULL;
    }
    while (PyDict_Next(groups, &pos, &key, &value)) {
        PyObject *first;
        Py_ssize_t n;
        long code;
        int known;
        if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 2 || !PyList_Check(value)
            || PyList_GET_SIZE(value) != 4) {
            PyErr_SetString(PyExc_TypeError,
                            "census_groups(): a group is (job, code) -> a list of 4 columns");
            goto error;
        }
        code = PyLong_AsLong(PyTuple_GET_ITEM(key, 1));
        if (code == -1 && PyErr_Occurred()) {
            goto error;
        }
        t = code == 1 || code == 2 ? 1 : (code <= -2 && code > -CENSUS_TYPES ? (int)-code : -1);
        if (t < 0) {
            PyErr_Format(PyExc_ValueError, "unknown group code %ld", code);
            goto error;
        }
        first = PyList_GET_ITEM(value, 0);
        n = PyObject_Length(first);
        if (n < 0) {
            goto error;
        }
        total += n;
        per[t] += n;
        known = PySequence_Contains(valid_ids, PyTuple_GET_ITEM(key, 0)); /* `in` */
        if (known < 0 || (!known && PyList_Append(unknown, key) < 0)) {
            goto error;
        }
    }
    for (t = 0; t < CENSUS_TYPES; t++) {
        PyObject *type, *sum;
        long long before = 0;
        if (!per[t]) {
            continue;
        }
        type = PyLong_FromLong(t);
        if (type == NULL) {
            goto error;
        }
        if (dict_get_longlong(counts, type, &before) < 0) {
            Py_DECREF(type);
            goto error;
        }
        sum = PyLong_FromLongLong(before + per[t]);
        if (sum == NULL || PyDict_SetItem(counts, type, sum) < 0) {
            Py_XDECREF(sum);
            Py_DECREF(type);
            goto error;
        }
        Py_DECREF(sum);
        Py_DECREF(type);
    }
    per_type = PyTuple_New(CENSUS_TYPES);
    if (per_type == NULL) {
        goto error;
    }
    for (t = 0; t < CENSUS_TYPES; t++) {
        PyObject *n = PyLong_FromSsize_t(per[t]);
        if (n == NULL) {
            Py_DECREF(per_type);
            goto error;
        }
        PyTuple_SET_ITEM(per_type, t, n);
    }
    result = Py_BuildValue("(nNN)", total, per_type, unknown);
    return result;
error:
    Py_DECREF(unknown);
    return NULL;
}

static PyObject *str_timestamps, *str_sequences, *str_arrivals, *str_contents, *str_nbytes;

PyDoc_STRVAR(new_columns_doc,
"new_columns() -> (list, list, list, list)\n\n"
"Four new empty lists that the cyclic garbage collector does not track, for columns that\n"
"only ever hold bytes and ints (which cannot be part of a reference cycle): the collector's\n"
"full passes then skip the items of every buffered message.  The decoder's group columns\n"
"are the same kind of list.");

static PyObject *
new_columns(PyObject *module, PyObject *unused)
{
    PyObject *out = PyTuple_New(4);
    int i;
    (void)module;
    (void)unused;
    if (out == NULL) {
        return NULL;
    }
    for (i = 0; i < 4; i++) {
        PyObject *column = new_column();
        if (column == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, column);
    }
    return out;
}

PyDoc_STRVAR(extend_groups_doc,
"extend_groups(groups, buffers, max_bytes, max_messages, overhead, position)\n\
    -> (messages, nbytes, key, position)\n\
\n\
From `position` (0 at first, then what the previous call returned) on, append each\n\
non-empty group to its buffer (buffers[key], with column attributes timestamps, sequences,\n\
arrivals, contents and an int nbytes) while that buffer is open (has messages) and stays\n\
below both limits with it (nbytes counting `overhead` per message).  Stop at the first\n\
other non-empty group (or one whose items are not all bytes), left untouched: return the\n\
messages and bytes appended, its key (None at the end of the groups) and the position to go\n\
on from after it.  The groups must not change between the calls of one walk.  An int column\n\
is a list, appended to a list, or a packed column (array.array), appended to one of the same\n\
type and typecode; a group whose columns do not match its buffer's that way is a stop.");

/* The items of a list or tuple in *items (NULL when empty) and their number in *size: 1,
 * or 0 (neither a list nor a tuple). */
static inline int
seq_items(PyObject *seq, PyObject ***items, Py_ssize_t *size)
{
    if (PyList_Check(seq)) {
        *size = PyList_GET_SIZE(seq);
        *items = ((PyListObject *)seq)->ob_item;
        return 1;
    }
    if (PyTuple_Check(seq)) {
        *size = PyTuple_GET_SIZE(seq);
        *items = ((PyTupleObject *)seq)->ob_item;
        return 1;
    }
    return 0;
}

/* Whether a and b are packed int columns of one type and item format (array.extend takes
 * one from the other without a per-item step). */
static int
same_packed(PyObject *a, PyObject *b)
{
    Py_buffer va, vb;
    int same;
    if (Py_TYPE(a) != Py_TYPE(b) || PyList_Check(a) || PyTuple_Check(a)
        || !PyObject_CheckBuffer(a)) {
        return 0;
    }
    if (PyObject_GetBuffer(a, &va, PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        return 0;
    }
    if (PyObject_GetBuffer(b, &vb, PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        PyBuffer_Release(&va);
        return 0;
    }
    same = va.itemsize == 8 && vb.itemsize == 8 && va.format != NULL && vb.format != NULL
           && strcmp(va.format, vb.format) == 0;
    PyBuffer_Release(&va);
    PyBuffer_Release(&vb);
    return same;
}

/* The length of a group column: a list's or tuple's, or a packed column's; -1 (no error
 * set) for anything else. */
static Py_ssize_t
group_column_size(PyObject *column)
{
    PyObject **items;
    Py_ssize_t n;
    if (seq_items(column, &items, &n)) {
        return n;
    }
    if (!PyObject_CheckBuffer(column)) {
        return -1;
    }
    n = PyObject_Length(column);
    if (n < 0) {
        PyErr_Clear();
    }
    return n;
}

/* Append group `columns` to `buf` when it fits: 1 appended (*messages, *nbytes set), 0 not
 * (the caller's step), -1 error set. */
static int
extend_one(PyObject *buf, PyObject **columns, Py_ssize_t n, long long max_bytes,
           long long max_messages, long long overhead, long long *nbytes)
{
    static PyObject **names[4] = {&str_timestamps, &str_sequences, &str_arrivals, &str_contents};
    PyObject *targets[4] = {NULL, NULL, NULL, NULL}, *have, *total, **items;
    Py_ssize_t open, i, count;
    long long size = 0, current;
    int c, rc = -1;

    for (c = 0; c < 4; c++) {
        targets[c] = PyObject_GetAttr(buf, *names[c]);
        if (targets[c] == NULL) {
            goto done;
        }
        /* A list takes a list's or tuple's items; a packed column a packed column's. */
        if (PyList_Check(targets[c])
                ? !(PyList_Check(columns[c]) || PyTuple_Check(columns[c]))
                : (c == 3 || !same_packed(targets[c], columns[c]))) {
            rc = 0;
            goto done;
        }
    }
    open = column_size(targets[0]);
    if (open < 0) {
        goto done;
    }
    if (open == 0 || open + n >= max_messages) {
        rc = 0;
        goto done;
    }
    have = PyObject_GetAttr(buf, str_nbytes);
    if (have == NULL) {
        goto done;
    }
    current = as_i64(have);
    Py_DECREF(have);
    if (current == -1 && PyErr_Occurred()) {
        goto done;
    }
    if (!seq_items(columns[3], &items, &count) || count != n) {
        rc = 0;
        goto done;
    }
    for (i = 0; i < n; i++) {
        if (!PyBytes_Check(items[i])) {
            rc = 0; /* not the decoder's: the caller's step measures it */
            goto done;
        }
        size += PyBytes_GET_SIZE(items[i]);
    }
    size += overhead * n;
    if (current + size >= max_bytes) {
        rc = 0;
        goto done;
    }
    for (c = 0; c < 4; c++) {
        if (PyList_Check(targets[c])) {
            Py_ssize_t at = PyList_GET_SIZE(targets[c]);
            if (PyList_SetSlice(targets[c], at, at, columns[c]) < 0) {
                goto done;
            }
        }
        else {
            /* array's += (its extend, by the C slot): a copy of the other's buffer. */
            PyObject *same = PySequence_InPlaceConcat(targets[c], columns[c]);
            if (same == NULL) {
                goto done;
            }
            Py_DECREF(same);
        }
    }
    total = PyLong_FromLongLong(current + size);
    if (total == NULL) {
        goto done;
    }
    rc = PyObject_SetAttr(buf, str_nbytes, total) < 0 ? -1 : 1;
    Py_DECREF(total);
    *nbytes = size;
done:
    for (c = 0; c < 4; c++) {
        Py_XDECREF(targets[c]);
    }
    return rc;
}

static PyObject *
extend_groups(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *groups, *buffers, *key, *value;
    Py_ssize_t pos;
    long long max_bytes, max_messages, overhead, messages = 0, nbytes = 0;

    (void)module;
    if (expect_args("extend_groups", nargs, 6) < 0) {
        return NULL;
    }
    groups = args[0];
    buffers = args[1];
    if (!PyDict_Check(groups) || !PyDict_Check(buffers)) {
        PyErr_SetString(PyExc_TypeError, "extend_groups() needs dicts of groups and buffers");
        return NULL;
    }
    max_bytes = PyLong_AsLongLong(args[2]);
    max_messages = PyLong_AsLongLong(args[3]);
    overhead = PyLong_AsLongLong(args[4]);
    pos = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (pos < 0) {
        PyErr_SetString(PyExc_ValueError, "extend_groups(): negative position");
        return NULL;
    }
    while (PyDict_Next(groups, &pos, &key, &value)) {
        PyObject **columns, **items, *buf;
        Py_ssize_t size, n, m;
        long long added = 0;
        int c, rc, fits = 1;

        if (!seq_items(value, &columns, &size) || size != 4
            || (n = group_column_size(columns[0])) < 0) {
            goto stop; /* not the decoder's shape: the caller's step says what it is */
        }
        if (n == 0) {
            continue;
        }
        for (c = 1; c < 4; c++) {
            m = c == 3 ? (seq_items(columns[c], &items, &m) ? m : -1)
                       : group_column_size(columns[c]);
            if (m != n) {
                fits = 0;
            }
        }
        buf = fits ? PyDict_GetItemWithError(buffers, key) : NULL;
        if (buf == NULL) {
            if (PyErr_Occurred()) {
                return NULL;
            }
            goto stop;
        }
        Py_INCREF(buf);
        rc = extend_one(buf, columns, n, max_bytes, max_messages, overhead, &added);
        Py_DECREF(buf);
        if (rc < 0) {
            return NULL;
        }
        if (rc == 0) {
            goto stop;
        }
        messages += n;
        nbytes += added;
    }
    return Py_BuildValue("(LLOn)", messages, nbytes, Py_None, pos);
stop:
    return Py_BuildValue("(LLOn)", messages, nbytes, key, pos);
}

/* -- has_none ---------------------------------------------------------------------------------- */

PyDoc_STRVAR(has_none_doc,
"has_none(lines) -> bool\n\n"
"Whether the list `lines` holds None: `None in lines` by identity alone, without the\n"
"equality call per item that `in` makes for each item that is not None.");

static PyObject *
has_none(PyObject *module, PyObject *lines)
{
    Py_ssize_t i, n;
    (void)module;
    if (!PyList_Check(lines)) {
        PyErr_SetString(PyExc_TypeError, "has_none() needs a list");
        return NULL;
    }
    n = PyList_GET_SIZE(lines);
    for (i = 0; i < n; i++) {
        if (PyList_GET_ITEM(lines, i) == Py_None) {
            Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
}

static PyMethodDef speedups_methods[] = {
    {"decode_log_frames", (PyCFunction)(void (*)(void))decode_log_frames, METH_FASTCALL,
     decode_log_frames_doc},
    {"plan_members", (PyCFunction)(void (*)(void))plan_members, METH_FASTCALL, plan_members_doc},
    {"decode_table", (PyCFunction)(void (*)(void))decode_table, METH_FASTCALL, decode_table_doc},
    {"line_bounds", (PyCFunction)(void (*)(void))line_bounds, METH_FASTCALL, line_bounds_doc},
    {"metric_json_line", (PyCFunction)(void (*)(void))metric_json_line, METH_FASTCALL,
     metric_json_line_doc},
    {"metric_json_lines", (PyCFunction)(void (*)(void))metric_json_lines, METH_FASTCALL,
     metric_json_lines_doc},
    {"event_json_lines", (PyCFunction)(void (*)(void))event_json_lines, METH_FASTCALL,
     event_json_lines_doc},
    {"metric_columns", (PyCFunction)(void (*)(void))metric_columns, METH_FASTCALL,
     metric_columns_doc},
    {"message_ends", (PyCFunction)(void (*)(void))message_ends, METH_FASTCALL, message_ends_doc},
    {"append_at", (PyCFunction)(void (*)(void))append_at, METH_FASTCALL, append_at_doc},
    {"has_none", has_none, METH_O, has_none_doc},
    {"census_groups", (PyCFunction)(void (*)(void))census_groups, METH_FASTCALL,
     census_groups_doc},
    {"extend_groups", (PyCFunction)(void (*)(void))extend_groups, METH_FASTCALL,
     extend_groups_doc},
    {"new_columns", (PyCFunction)new_columns, METH_NOARGS, new_columns_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    "joblet_persist._speedups",
    "C implementations of the IPC frame decoder and of member table encoding and decoding.",
    -1,
    speedups_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *module, *seed_source;
    Py_hash_t seed;
    int i;

    str_slow = PyUnicode_InternFromString("slow");
    str_partial = PyUnicode_InternFromString("partial");
    str_timestamps = PyUnicode_InternFromString("timestamps");
    str_sequences = PyUnicode_InternFromString("sequences");
    str_arrivals = PyUnicode_InternFromString("arrivals");
    str_contents = PyUnicode_InternFromString("contents");
    str_nbytes = PyUnicode_InternFromString("nbytes");
    str_end = PyUnicode_InternFromString("end");
    {
        PyObject *array_module = PyImport_ImportModule("array");
        if (array_module == NULL) {
            return NULL;
        }
        packed_one_signed = PyObject_CallMethod(array_module, "array", "s[i]", "q", 0);
        packed_one_unsigned = PyObject_CallMethod(array_module, "array", "s[i]", "Q", 0);
        Py_DECREF(array_module);
        if (packed_one_signed == NULL || packed_one_unsigned == NULL) {
            return NULL;
        }
    }
    if (str_slow == NULL || str_partial == NULL || str_end == NULL || str_timestamps == NULL
        || str_sequences == NULL || str_arrivals == NULL || str_contents == NULL
        || str_nbytes == NULL) {
        return NULL;
    }
    for (i = 0; i < 3; i++) {
        stream_numbers[i] = PyLong_FromLong(i);
        if (stream_numbers[i] == NULL) {
            return NULL;
        }
    }
    for (i = 0; i < 10; i++) {
        type_keys[i] = PyLong_FromLong(-i);
        if (type_keys[i] == NULL) {
            return NULL;
        }
    }
    /* The job table's hash takes its seed from the interpreter's randomized bytes hash, so
     * that the ids a peer sends cannot be chosen to collide. */
    seed_source = PyBytes_FromString("joblet_persist._speedups");
    if (seed_source == NULL) {
        return NULL;
    }
    seed = PyObject_Hash(seed_source);
    Py_DECREF(seed_source);
    if (seed == -1 && PyErr_Occurred()) {
        return NULL;
    }
    hash_seed = (uint64_t)seed;
    module = PyModule_Create(&speedups_module);
    return module;
}
