/* The hot loops of materialisation, one pass per row, the GIL released (DuckDB keeps
 * scanning in its own thread meanwhile), and the offline index's lookup (asof_rows, at the
 * end of this file).
 *
 * featurepipe.online.codec and featurepipe.online.dump build the same bytes with NumPy:
 * that is the fallback when this module is not compiled, and the tests' second opinion
 * (where the formats are documented too).
 *
 *   scalar_values(tag, kind, values, valid) -> (data, lengths)
 *
 *   Serialized feast Value protos of a numeric column: ``tag`` then 8 bytes (kind 0,
 *   float64; NaN is null), 4 bytes (kind 1, float32; NaN is null) or a varint (kind 2,
 *   int64). ``valid`` is a bool array or None (all valid); a null is the empty Value.
 *   Returns row i as data[i * width : i * width + lengths[i]] (width 9, 5 or 11).
 *
 *   timestamps(micros) -> (data, lengths)
 *
 *   Serialized google.protobuf.Timestamp of epoch microseconds (width 17).
 *
 *   restore_commands(keys, key_lengths, fields, values, ttl) -> bytes
 *
 *   RESTORE commands of whole Redis hashes, one per row: it sizes every command, then
 *   writes the RESP framing, the listpack and the CRC-64/Redis of each payload. Row i's
 *   key is keys[i, :key_lengths[i]] (uint8 matrix, int64 lengths); its hash holds
 *   fields[j] (bytes) = values[j][0][i, :values[j][1][i]] for each (matrix, lengths)
 *   pair, in that order; ttl is the TTL argument in milliseconds, as decimal digits.
 *
 *   schedules(v, row_groups, columns, kinds, offsets, head) -> (data, lengths)
 *
 *   Window schedules (featurepipe.online.schedule), one per entity; see the function.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "featurepipe's C part assumes a little-endian machine (the NumPy fallback does not)"
#endif

static uint64_t crc_table[8][256];  /* slicing-by-8 */

static void crc_init(void) {
    for (int i = 0; i < 256; i++) {
        uint64_t c = (uint64_t)i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ ((c & 1) ? 0x95AC9329AC4BC9B5ULL : 0);
        crc_table[0][i] = c;
    }
    for (int i = 0; i < 256; i++)
        for (int k = 1; k < 8; k++)
            crc_table[k][i] = crc_table[0][crc_table[k - 1][i] & 0xFF] ^ (crc_table[k - 1][i] >> 8);
}

/* CRC-64/Redis: Jones polynomial, reflected, initial value 0, no final XOR. */
static uint64_t crc64(const uint8_t *p, Py_ssize_t n) {
    uint64_t crc = 0;
    while (n >= 8) {
        uint64_t x = crc;
        for (int k = 0; k < 8; k++) x ^= (uint64_t)p[k] << (8 * k);  /* little-endian load */
        crc = crc_table[7][x & 0xFF] ^ crc_table[6][(x >> 8) & 0xFF] ^ crc_table[5][(x >> 16) & 0xFF]
              ^ crc_table[4][(x >> 24) & 0xFF] ^ crc_table[3][(x >> 32) & 0xFF]
              ^ crc_table[2][(x >> 40) & 0xFF] ^ crc_table[1][(x >> 48) & 0xFF] ^ crc_table[0][x >> 56];
        p += 8;
        n -= 8;
    }
    while (n-- > 0) crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

static int backlen_size(int64_t n) {
    if (n <= 127) return 1;
    if (n < 16383) return 2;
    if (n < 2097151) return 3;
    if (n < 268435455) return 4;
    return 5;
}

static int64_t entry_size(int64_t n) {
    int64_t head = n < 64 ? 1 : n < 4096 ? 2 : 5;
    return head + n + backlen_size(head + n);
}

static int digits(int64_t n) {
    int d = 1;
    while (n >= 10) { n /= 10; d++; }
    return d;
}

static uint8_t *put_bulk_head(uint8_t *out, int64_t n) {
    int d = digits(n);
    *out++ = '$';
    for (int k = d - 1; k >= 0; k--) { out[k] = (uint8_t)('0' + n % 10); n /= 10; }
    out += d;
    *out++ = '\r';
    *out++ = '\n';
    return out;
}

static uint8_t *put_entry(uint8_t *out, const uint8_t *src, int64_t n) {
    int head;
    if (n < 64) {
        out[0] = (uint8_t)(0x80 | n);
        head = 1;
    } else if (n < 4096) {
        out[0] = (uint8_t)(0xE0 | (n >> 8));
        out[1] = (uint8_t)(n & 0xFF);
        head = 2;
    } else {
        out[0] = 0xF0;
        for (int k = 0; k < 4; k++) out[1 + k] = (uint8_t)((n >> (8 * k)) & 0xFF);
        head = 5;
    }
    out += head;
    memcpy(out, src, (size_t)n);
    out += n;
    int64_t total = head + n;
    int size = backlen_size(total);
    for (int j = 0; j < size; j++)  /* big-endian 7-bit groups, high bit on all but the first */
        out[j] = (uint8_t)(((total >> (7 * (size - 1 - j))) & 0x7F) | (j > 0 ? 0x80 : 0));
    return out + size;
}

static const char HEAD[] = "*4\r\n$7\r\nRESTORE\r\n";

static int get(PyObject *obj, Py_buffer *view, const char *name, int ndim, Py_ssize_t itemsize) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (view->ndim != ndim || view->itemsize != itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous %d-d array of %zd-byte items",
                     name, ndim, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static uint8_t *put_varint(uint8_t *out, uint64_t u) {
    while (u >= 0x80) {
        *out++ = (uint8_t)((u & 0x7F) | 0x80);
        u >>= 7;
    }
    *out++ = (uint8_t)u;
    return out;
}

/* Two new bytes objects of n rows: a padded matrix (width bytes a row) and int64 lengths. */
static int new_rows(Py_ssize_t n, Py_ssize_t width, PyObject **data, PyObject **lengths) {
    *data = PyBytes_FromStringAndSize(NULL, n * width);
    *lengths = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    if (*data == NULL || *lengths == NULL) {
        Py_XDECREF(*data);
        Py_XDECREF(*lengths);
        return -1;
    }
    memset(PyBytes_AS_STRING(*data), 0, (size_t)(n * width));
    return 0;
}

static PyObject *scalar_values(PyObject *self, PyObject *args) {
    int tag, kind;
    PyObject *vo, *mo;
    if (!PyArg_ParseTuple(args, "iiOO", &tag, &kind, &vo, &mo)) return NULL;
    if (kind < 0 || kind > 2 || tag < 0 || tag > 255) {
        PyErr_SetString(PyExc_ValueError, "scalar_values: unknown kind or tag");
        return NULL;
    }
    Py_buffer v, m;
    int have_mask = mo != Py_None;
    if (get(vo, &v, "values", 1, kind == 1 ? 4 : 8) < 0) return NULL;
    if (have_mask && get(mo, &m, "valid", 1, 1) < 0) {
        PyBuffer_Release(&v);
        return NULL;
    }
    Py_ssize_t n = v.shape[0], size = kind == 0 ? 8 : 4, width = kind == 2 ? 11 : 1 + size;
    PyObject *data = NULL, *lengths = NULL, *result = NULL;
    if (have_mask && m.shape[0] != n) {
        PyErr_SetString(PyExc_ValueError, "scalar_values: values and valid differ in length");
        goto done;
    }
    if (new_rows(n, width, &data, &lengths) < 0) goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(data);
    int64_t *len = (int64_t *)PyBytes_AS_STRING(lengths);
    const uint8_t *valid = have_mask ? m.buf : NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++, out += width) {
        int present = valid == NULL || valid[i];
        if (kind != 2) {  /* fixed width: the bytes as they are, NaN is null */
            const uint8_t *src = (const uint8_t *)v.buf + size * i;
            if (present && kind == 0) {
                double x;
                memcpy(&x, src, 8);
                present = !isnan(x);
            } else if (present) {
                float x;
                memcpy(&x, src, 4);
                present = !isnan(x);
            }
            if (present) {
                out[0] = (uint8_t)tag;
                memcpy(out + 1, src, (size_t)size);
                len[i] = 1 + size;
            } else len[i] = 0;
        } else {
            if (present) {
                out[0] = (uint8_t)tag;
                len[i] = put_varint(out + 1, (uint64_t)((const int64_t *)v.buf)[i]) - out;
            } else len[i] = 0;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OO)", data, lengths);
done:
    Py_XDECREF(data);
    Py_XDECREF(lengths);
    PyBuffer_Release(&v);
    if (have_mask) PyBuffer_Release(&m);
    return result;
}

static PyObject *timestamps(PyObject *self, PyObject *args) {
    PyObject *vo;
    if (!PyArg_ParseTuple(args, "O", &vo)) return NULL;
    Py_buffer v;
    if (get(vo, &v, "micros", 1, 8) < 0) return NULL;
    Py_ssize_t n = v.shape[0], width = 17;
    PyObject *data = NULL, *lengths = NULL, *result = NULL;
    if (new_rows(n, width, &data, &lengths) < 0) goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(data);
    int64_t *len = (int64_t *)PyBytes_AS_STRING(lengths);
    const int64_t *micros = v.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++, out += width) {
        int64_t sec = micros[i] / 1000000, rest = micros[i] % 1000000;
        if (rest < 0) {  /* floor division, as NumPy's */
            sec -= 1;
            rest += 1000000;
        }
        uint8_t *p = out;
        if (sec != 0) {
            *p++ = 0x08;
            p = put_varint(p, (uint64_t)sec);
        }
        if (rest != 0) {
            *p++ = 0x10;
            p = put_varint(p, (uint64_t)(rest * 1000));
        }
        len[i] = p - out;
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OO)", data, lengths);
done:
    Py_XDECREF(data);
    Py_XDECREF(lengths);
    PyBuffer_Release(&v);
    return result;
}

static PyObject *restore_commands(PyObject *self, PyObject *args) {
    PyObject *ko, *lo, *fo, *vo;
    Py_buffer ttl_view;
    if (!PyArg_ParseTuple(args, "OOOOy*", &ko, &lo, &fo, &vo, &ttl_view)) return NULL;
    PyObject *result = NULL, *fseq = NULL, *vseq = NULL;
    Py_buffer kb, lb;
    int have_k = 0, have_l = 0;
    Py_ssize_t m = 0, got_v = 0;
    Py_buffer *vdata = NULL, *vlens = NULL;   /* per feature: matrix, lengths (or none) */
    const uint8_t **fptr = NULL;
    int64_t *flen = NULL, *lps = NULL;

    if (get(ko, &kb, "keys", 2, 1) < 0) goto done;
    have_k = 1;
    if (get(lo, &lb, "key lengths", 1, 8) < 0) goto done;
    have_l = 1;
    fseq = PySequence_Fast(fo, "fields: expected a sequence of bytes");
    vseq = PySequence_Fast(vo, "values: expected a sequence of (matrix, lengths) pairs");
    if (fseq == NULL || vseq == NULL) goto done;
    m = PySequence_Fast_GET_SIZE(fseq);
    Py_ssize_t n = kb.shape[0], kw = kb.shape[1];
    if (PySequence_Fast_GET_SIZE(vseq) != m || lb.shape[0] != n) {
        PyErr_SetString(PyExc_ValueError, "restore_commands: as many fields as values, as many key lengths as keys");
        goto done;
    }
    vdata = PyMem_Calloc((size_t)m + 1, sizeof(Py_buffer));
    vlens = PyMem_Calloc((size_t)m + 1, sizeof(Py_buffer));
    fptr = PyMem_Calloc((size_t)m + 1, sizeof(uint8_t *));
    flen = PyMem_Calloc((size_t)m + 1, sizeof(int64_t));
    if (!vdata || !vlens || !fptr || !flen) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < m; j++) {
        PyObject *f = PySequence_Fast_GET_ITEM(fseq, j), *pair = PySequence_Fast_GET_ITEM(vseq, j);
        if (!PyBytes_Check(f)) {
            PyErr_SetString(PyExc_TypeError, "restore_commands: field names must be bytes");
            goto done;
        }
        fptr[j] = (const uint8_t *)PyBytes_AS_STRING(f);
        flen[j] = PyBytes_GET_SIZE(f);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "restore_commands: each value is a (matrix, lengths) tuple");
            goto done;
        }
        if (get(PyTuple_GET_ITEM(pair, 0), &vdata[j], "value matrix", 2, 1) < 0) goto done;
        if (get(PyTuple_GET_ITEM(pair, 1), &vlens[j], "value lengths", 1, 8) < 0) {
            PyBuffer_Release(&vdata[j]);
            goto done;
        }
        got_v = j + 1;
        if (vdata[j].shape[0] != n || vlens[j].shape[0] != n) {
            PyErr_SetString(PyExc_ValueError, "restore_commands: every value column needs one row per key");
            goto done;
        }
    }
    const uint8_t *kdata = kb.buf, *ttl = ttl_view.buf;
    const int64_t *klen = lb.buf;
    Py_ssize_t ttl_len = ttl_view.len, head_len = (Py_ssize_t)(sizeof HEAD - 1);
    int64_t fixed = 0;
    for (Py_ssize_t j = 0; j < m; j++) fixed += entry_size(flen[j]);
    int count = (int)(2 * m < 65535 ? 2 * m : 65535);

    int64_t total = 0;
    lps = PyMem_Malloc(((size_t)n + 1) * sizeof(int64_t));  /* each row's listpack size */
    if (lps == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (klen[i] < 0 || klen[i] > kw) {
            PyErr_SetString(PyExc_ValueError, "restore_commands: key length out of range");
            goto done;
        }
        int64_t lp = 7 + fixed;
        for (Py_ssize_t j = 0; j < m; j++) {
            int64_t len = ((const int64_t *)vlens[j].buf)[i];
            if (len < 0 || len > vdata[j].shape[1]) {
                PyErr_SetString(PyExc_ValueError, "restore_commands: value length out of range");
                goto done;
            }
            lp += entry_size(len);
        }
        lps[i] = lp;
        int rdb = lp < 64 ? 1 : lp < 16384 ? 2 : 5;
        int64_t plen = 1 + rdb + lp + 2 + 8;
        total += head_len + 1 + digits(klen[i]) + 2 + klen[i] + 2 + 1 + digits(ttl_len) + 2 + ttl_len + 2
                 + 1 + digits(plen) + 2 + plen + 2;
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (result == NULL) goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);

    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t lp = lps[i];
        int rdb = lp < 64 ? 1 : lp < 16384 ? 2 : 5;

        memcpy(out, HEAD, (size_t)head_len);
        out = put_bulk_head(out + head_len, klen[i]);
        memcpy(out, kdata + i * kw, (size_t)klen[i]);
        out += klen[i];
        *out++ = '\r';
        *out++ = '\n';
        out = put_bulk_head(out, ttl_len);
        memcpy(out, ttl, (size_t)ttl_len);
        out += ttl_len;
        *out++ = '\r';
        *out++ = '\n';
        out = put_bulk_head(out, 1 + rdb + lp + 2 + 8);

        uint8_t *payload = out;
        *out++ = 16;  /* RDB_TYPE_HASH_LISTPACK */
        if (rdb == 1) {
            *out++ = (uint8_t)lp;
        } else if (rdb == 2) {
            *out++ = (uint8_t)(0x40 | (lp >> 8));
            *out++ = (uint8_t)(lp & 0xFF);
        } else {
            *out++ = 0x80;
            for (int k = 3; k >= 0; k--) *out++ = (uint8_t)((lp >> (8 * k)) & 0xFF);
        }
        for (int k = 0; k < 4; k++) *out++ = (uint8_t)((lp >> (8 * k)) & 0xFF);
        *out++ = (uint8_t)(count & 0xFF);
        *out++ = (uint8_t)(count >> 8);
        for (Py_ssize_t j = 0; j < m; j++) {
            out = put_entry(out, fptr[j], flen[j]);
            out = put_entry(out, (const uint8_t *)vdata[j].buf + i * vdata[j].shape[1],
                            ((const int64_t *)vlens[j].buf)[i]);
        }
        *out++ = 0xFF;
        *out++ = 10;  /* RDB version 10, little-endian */
        *out++ = 0;
        uint64_t crc = crc64(payload, out - payload);
        for (int k = 0; k < 8; k++) *out++ = (uint8_t)((crc >> (8 * k)) & 0xFF);
        *out++ = '\r';
        *out++ = '\n';
    }
    Py_END_ALLOW_THREADS

done:
    if (PyErr_Occurred()) Py_CLEAR(result);
    for (Py_ssize_t j = 0; j < got_v; j++) {
        PyBuffer_Release(&vdata[j]);
        PyBuffer_Release(&vlens[j]);
    }
    PyMem_Free(vdata);
    PyMem_Free(vlens);
    PyMem_Free(fptr);
    PyMem_Free(flen);
    PyMem_Free(lps);
    Py_XDECREF(fseq);
    Py_XDECREF(vseq);
    if (have_k) PyBuffer_Release(&kb);
    if (have_l) PyBuffer_Release(&lb);
    PyBuffer_Release(&ttl_view);
    return result;
}

static PyObject *py_crc64(PyObject *self, PyObject *args) {
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    uint64_t crc = crc64(data.buf, data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(crc);
}

/* asof_rows(keys, starts, ts, qkeys, known, qts, ttl, out): the offline index's lookup
 * (featurepipe.offline.index, which has the NumPy fallback). keys: distinct uint64 sort
 * keys, ascending; starts: int64, len(keys) + 1, where each key's rows start; ts: int64 event
 * times, ascending within a key. For query i (skipped where known[i] is 0): the last row r of
 * key qkeys[i] with ts[r] <= qts[i], and, if ttl >= 0, ts[r] >= qts[i] - ttl; out[i] = r or -1.
 */
static PyObject *asof_rows(PyObject *self, PyObject *args) {
    PyObject *ko, *so, *to, *qko, *kno, *qto, *oo;
    long long ttl;
    if (!PyArg_ParseTuple(args, "OOOOOOLO", &ko, &so, &to, &qko, &kno, &qto, &ttl, &oo)) return NULL;
    Py_buffer kb, sb, tb, qkb, knb, qtb, ob;
    int got = 0;
    PyObject *result = NULL;
    if (get(ko, &kb, "keys", 1, 8) < 0) goto done;
    got = 1;
    if (get(so, &sb, "starts", 1, 8) < 0) goto done;
    got = 2;
    if (get(to, &tb, "ts", 1, 8) < 0) goto done;
    got = 3;
    if (get(qko, &qkb, "qkeys", 1, 8) < 0) goto done;
    got = 4;
    if (get(kno, &knb, "known", 1, 1) < 0) goto done;
    got = 5;
    if (get(qto, &qtb, "qts", 1, 8) < 0) goto done;
    got = 6;
    if (PyObject_GetBuffer(oo, &ob, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) goto done;
    got = 7;
    Py_ssize_t nk = kb.len / 8, nrows = tb.len / 8, n = qkb.len / 8;
    if (sb.len / 8 != nk + 1 || knb.len != n || qtb.len / 8 != n || ob.len / 8 != n || ob.itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "asof_rows: array lengths do not match");
        goto done;
    }
    const uint64_t *keys = kb.buf, *qkeys = qkb.buf;
    const int64_t *starts = sb.buf, *ts = tb.buf, *qts = qtb.buf;
    const uint8_t *known = knb.buf;
    int64_t *out = ob.buf;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = -1;
        if (!known[i]) continue;
        uint64_t q = qkeys[i];
        Py_ssize_t lo = 0, hi = nk;  /* first key >= q */
        while (lo < hi) {
            Py_ssize_t mid = lo + ((hi - lo) >> 1);
            if (keys[mid] < q) lo = mid + 1; else hi = mid;
        }
        if (lo == nk || keys[lo] != q) continue;
        int64_t first = starts[lo], end = starts[lo + 1];
        if (first < 0 || end < first || end > nrows) { bad = 1; break; }
        int64_t t = qts[i], a = first, b = end;  /* first row with ts > t */
        while (a < b) {
            int64_t mid = a + ((b - a) >> 1);
            if (ts[mid] <= t) a = mid + 1; else b = mid;
        }
        int64_t r = a - 1;
        if (r < first) continue;
        if (ttl >= 0 && ts[r] < t - ttl) continue;
        out[i] = r;
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "asof_rows: starts out of range (a damaged index?)");
        goto done;
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    if (got >= 7) PyBuffer_Release(&ob);
    if (got >= 6) PyBuffer_Release(&qtb);
    if (got >= 5) PyBuffer_Release(&knb);
    if (got >= 4) PyBuffer_Release(&qkb);
    if (got >= 3) PyBuffer_Release(&tb);
    if (got >= 2) PyBuffer_Release(&sb);
    if (got >= 1) PyBuffer_Release(&kb);
    return result;
}

/* schedules(v, row_groups, columns, kinds, offsets, head) -> (data, lengths)
 *
 * Window schedules (featurepipe.online.schedule's layout), one per entity: entity e has
 * rows offsets[e]:offsets[e + 1] of v (int64), of row_groups (int64: -1 on the entity's
 * first row, then each group's rows, groups ascending) and of each column (8-byte items,
 * kinds[c] b'i' or b'f', written as they are: NaN stays NaN). head is what every
 * schedule of the view starts with: the header, the m column groups (head[14 + c]) and
 * kinds, padded to a multiple of 8; k, the number of groups, is in bytes 4-7. Group g of
 * an entity is its first row then its rows of group g: n (int64), v, its columns. Row e
 * of the result is data[e * width : e * width + lengths[e]], width the longest schedule. */
static PyObject *schedules(PyObject *self, PyObject *args) {
    PyObject *vo, *go, *co, *oo;
    Py_buffer kinds, head;
    if (!PyArg_ParseTuple(args, "OOOy*Oy*", &vo, &go, &co, &kinds, &oo, &head)) return NULL;
    PyObject *result = NULL, *data = NULL, *lengths = NULL, *cseq = NULL;
    Py_buffer vb, gb, ob, *cols = NULL;
    int have_v = 0, have_g = 0, have_o = 0;
    Py_ssize_t m = 0, got = 0;
    int64_t *count = NULL;
    uint32_t k = 0;
    if (get(vo, &vb, "v", 1, 8) < 0) goto done;
    have_v = 1;
    if (get(go, &gb, "row_groups", 1, 8) < 0) goto done;
    have_g = 1;
    if (get(oo, &ob, "offsets", 1, 8) < 0) goto done;
    have_o = 1;
    cseq = PySequence_Fast(co, "schedules: columns must be a sequence");
    if (cseq == NULL) goto done;
    m = PySequence_Fast_GET_SIZE(cseq);
    if (m != kinds.len || head.len < 14 + 2 * m || head.len % 8 ||
        memcmp((const uint8_t *)head.buf + 14 + m, kinds.buf, (size_t)m) != 0) {
        PyErr_SetString(PyExc_ValueError,
                        "schedules: the head must hold one group and one kind per column (the kinds given), "
                        "padded to a multiple of 8 bytes");
        goto done;
    }
    const uint8_t *colgroup = (const uint8_t *)head.buf + 14;
    memcpy(&k, (const uint8_t *)head.buf + 4, 4);
    for (Py_ssize_t c = 0; c < m; c++)
        if (colgroup[c] >= k) {
            PyErr_SetString(PyExc_ValueError, "schedules: a column's group is beyond the groups");
            goto done;
        }
    cols = PyMem_Calloc((size_t)(m ? m : 1), sizeof(Py_buffer));
    count = PyMem_Calloc((size_t)(k ? k : 1), sizeof(int64_t));
    if (cols == NULL || count == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < m; got++)
        if (get(PySequence_Fast_GET_ITEM(cseq, got), &cols[got], "column", 1, 8) < 0) goto done;
    Py_ssize_t e = ob.shape[0] > 0 ? ob.shape[0] - 1 : 0, total = vb.shape[0];
    const int64_t *off = ob.buf, *rg = gb.buf;
    if (gb.shape[0] != total) {
        PyErr_SetString(PyExc_ValueError, "schedules: row_groups differs in length from v");
        goto done;
    }
    for (Py_ssize_t c = 0; c < m; c++)
        if (cols[c].shape[0] != total) {
            PyErr_SetString(PyExc_ValueError, "schedules: a column differs in length from v");
            goto done;
        }
    /* sizes: each group holds the first row and its own rows */
    int64_t width = 0;
    for (Py_ssize_t g = 0; g < e; g++) {
        int64_t lo = off[g], hi = off[g + 1];
        if (hi <= lo || lo < 0 || hi > total || hi - lo > 0xFFFFFFFFLL) {
            PyErr_SetString(PyExc_ValueError, "schedules: offsets out of order, empty or beyond the rows");
            goto done;
        }
        if (rg[lo] != -1) {
            PyErr_SetString(PyExc_ValueError, "schedules: an entity's first row is not of group -1");
            goto done;
        }
        int64_t size = head.len, prev = 0;
        for (int64_t i = lo + 1; i < hi; i++)
            if (rg[i] < prev || rg[i] >= (int64_t)k) {
                PyErr_SetString(PyExc_ValueError, "schedules: rows out of group order, or of no group");
                goto done;
            } else prev = rg[i];
        memset(count, 0, sizeof(int64_t) * k);
        for (int64_t i = lo + 1; i < hi; i++) count[rg[i]]++;
        for (uint32_t j = 0; j < k; j++) size += 8 + 8 * (count[j] + 1);
        for (Py_ssize_t c = 0; c < m; c++) size += 8 * (count[colgroup[c]] + 1);
        if (size > width) width = size;
    }
    if (new_rows(e, (Py_ssize_t)width, &data, &lengths) < 0) goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(data);
    int64_t *len = (int64_t *)PyBytes_AS_STRING(lengths);
    const int64_t *vv = vb.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t g = 0; g < e; g++) {
        uint8_t *p = out + g * width;
        int64_t lo = off[g], hi = off[g + 1], i = lo + 1;
        memcpy(p, head.buf, (size_t)head.len);
        p += head.len;
        for (uint32_t j = 0; j < k; j++) {
            int64_t from = i;  /* this group's rows: from .. i - 1 */
            while (i < hi && rg[i] == (int64_t)j) i++;
            int64_t n = i - from + 1;
            memcpy(p, &n, 8);
            p += 8;
            memcpy(p, vv + lo, 8);
            memcpy(p + 8, vv + from, (size_t)(8 * (i - from)));
            p += 8 * n;
            for (Py_ssize_t c = 0; c < m; c++) {
                if (colgroup[c] != j) continue;
                const uint8_t *src = cols[c].buf;
                memcpy(p, src + 8 * lo, 8);
                memcpy(p + 8, src + 8 * from, (size_t)(8 * (i - from)));
                p += 8 * n;
            }
        }
        len[g] = p - (out + g * width);
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OO)", data, lengths);
done:
    Py_XDECREF(data);
    Py_XDECREF(lengths);
    for (Py_ssize_t c = 0; c < got; c++) PyBuffer_Release(&cols[c]);
    PyMem_Free(cols);
    PyMem_Free(count);
    Py_XDECREF(cseq);
    if (have_v) PyBuffer_Release(&vb);
    if (have_g) PyBuffer_Release(&gb);
    if (have_o) PyBuffer_Release(&ob);
    PyBuffer_Release(&kinds);
    PyBuffer_Release(&head);
    return result;
}

/* schedule_cells(data, t_us, columns) -> None or (v_us, [(kind, offset), ...])
 *
 * The server's read of one stored window schedule (featurepipe.online.schedule's layout 3,
 * whose header the caller has checked): in each group the row with the greatest v <= t_us,
 * the latest such v over the groups, and for each requested column its kind byte and the
 * offset of its 8 bytes in force. None when t_us is before the first change point.
 * ValueError when the field is malformed. */
static PyObject *schedule_cells(PyObject *self, PyObject *args) {
    Py_buffer b;
    long long t;
    PyObject *co, *seq = NULL, *result = NULL, *list = NULL;
    int64_t *base = NULL, *place = NULL;
    if (!PyArg_ParseTuple(args, "y*LO", &b, &t, &co)) return NULL;
    const uint8_t *d = b.buf;
    Py_ssize_t len = b.len;
    uint32_t k = 0;
    uint16_t m = 0;
    if (len >= 14) {
        memcpy(&k, d + 4, 4);
        memcpy(&m, d + 8, 2);
    }
    Py_ssize_t start = 14 + 2 * (Py_ssize_t)m;
    start += (8 - start % 8) % 8;
    if (len < 14 || k > 255 || start > len || (len - start) % 8) goto malformed;
    const uint8_t *groups = d + 14, *kinds = d + 14 + m, *w = d + start;
    int64_t words = (len - start) / 8, i = 0, v_us = 0, first_row = -1, count[256] = {0};
    int have = 0;
    base = PyMem_Calloc((size_t)(k ? k : 1), sizeof(int64_t));
    place = PyMem_Calloc((size_t)(m ? m : 1), sizeof(int64_t));
    if (base == NULL || place == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t c = 0; c < m; c++) {
        if (groups[c] >= k) goto malformed;
        place[c] = count[groups[c]]++;
    }
    for (uint32_t g = 0; g < k; g++) {
        int64_t n, lo = 0, hi, v;
        if (i >= words) goto malformed;
        memcpy(&n, w + 8 * i, 8);
        if (n < 1 || n > words - i - 1) goto malformed;
        hi = n;
        while (lo < hi) {  /* the number of change points at or before t */
            int64_t mid = lo + (hi - lo) / 2;
            memcpy(&v, w + 8 * (i + 1 + mid), 8);
            if (v <= t) lo = mid + 1; else hi = mid;
        }
        if (g == 0) first_row = lo - 1;
        if (lo > 0) {
            memcpy(&v, w + 8 * (i + lo), 8);
            if (!have || v > v_us) v_us = v;
            have = 1;
        }
        base[g] = start + 8 * (i + n + lo);  /* the group's first column, at row lo - 1 */
        if (count[g] > (words - i - 1 - n) / n) goto malformed;
        i += 1 + n + count[g] * n;
        count[g] = (count[g] << 32) | n;  /* from here: columns << 32 | rows */
    }
    if (i != words) goto malformed;
    if (first_row < 0) {
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }
    seq = PySequence_Fast(co, "schedule_cells: columns must be a sequence");
    if (seq == NULL) goto done;
    Py_ssize_t q = PySequence_Fast_GET_SIZE(seq);
    list = PyList_New(q);
    if (list == NULL) goto done;
    for (Py_ssize_t j = 0; j < q; j++) {
        Py_ssize_t c = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, j));
        if (c == -1 && PyErr_Occurred()) goto done;
        if (c < 0 || c >= m) {
            PyErr_SetString(PyExc_IndexError, "schedule_cells: a column beyond the schedule's");
            goto done;
        }
        int64_t n = count[groups[c]] & 0xFFFFFFFFLL;
        PyObject *cell = Py_BuildValue("(iL)", (int)kinds[c], (long long)(base[groups[c]] + 8 * n * place[c]));
        if (cell == NULL) goto done;
        PyList_SET_ITEM(list, j, cell);
    }
    result = Py_BuildValue("(LO)", (long long)v_us, list);
    goto done;
malformed:
    PyErr_SetString(PyExc_ValueError, "schedule_cells: malformed schedule");
done:
    Py_XDECREF(list);
    Py_XDECREF(seq);
    PyMem_Free(base);
    PyMem_Free(place);
    PyBuffer_Release(&b);
    return result;
}

static PyMethodDef methods[] = {
    {"asof_rows", asof_rows, METH_VARARGS, "The offline index's point-in-time lookup, one binary search pair a row."},
    {"scalar_values", scalar_values, METH_VARARGS, "Serialized feast Value protos of a numeric column."},
    {"timestamps", timestamps, METH_VARARGS, "Serialized protobuf Timestamps of epoch microseconds."},
    {"restore_commands", restore_commands, METH_VARARGS, "RESTORE commands of whole hashes, one per row."},
    {"schedules", schedules, METH_VARARGS, "Window schedules, one per entity."},
    {"schedule_cells", schedule_cells, METH_VARARGS, "The values of a window schedule in force at an instant."},
    {"crc64", py_crc64, METH_VARARGS, "CRC-64/Redis of a bytes-like object."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    crc_init();
    return PyModule_Create(&module);
}
