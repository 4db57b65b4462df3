/* template.c: pure mail logic (see template.h): the placeholder grammar,
 * header encoding, the message text of an outbox row and the retry
 * schedule. No I/O, no globals: the mail workers call it from their
 * threads, the validator of template.upserted from the loop, and the unit
 * tests directly.
 *
 * Invariant of the header code: every byte written into a header is
 * printable ASCII, a space, or the CRLF SP of a fold that this file
 * inserted itself. Values pass through rd_tpl_header_clean first, then are
 * either written as printable ASCII or as base64 encoded words. */
#include "template.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- placeholders ---- */

static const char *const person_keys[] = {"email",    "first_name", "last_name", "company",
					  "language", "phone",	    "street",	 "zip",
					  "city",     "country",    "birthdate", NULL};

static const char *const fixed_names[] = {"booking.number",  "booking.total",  "offer.title",
					  "offer.starts_at", "invoice.number", "invoice.amount",
					  "invoice.due",     "payment.amount", NULL};

static bool has_prefix(const char *s, size_t len, const char *prefix)
{
	size_t n = strlen(prefix);
	return len >= n && memcmp(s, prefix, n) == 0;
}

static bool is_name(const char *s, size_t len, const char *name)
{
	return strlen(name) == len && memcmp(s, name, len) == 0;
}

/* A free key (contact.fields.KEY, vars.KEY): non-empty, no braces. */
static bool free_key_ok(const char *s, size_t len)
{
	if (len == 0)
		return false;
	for (size_t i = 0; i < len; i++)
		if (s[i] == '{' || s[i] == '}' || s[i] == '\0')
			return false;
	return true;
}

bool rd_tpl_known(const char *name, size_t len)
{
	if (has_prefix(name, len, "contact.fields."))
		return free_key_ok(name + 15, len - 15);
	if (has_prefix(name, len, "vars."))
		return free_key_ok(name + 5, len - 5);
	if (has_prefix(name, len, "contact.")) {
		for (size_t i = 0; person_keys[i]; i++)
			if (is_name(name + 8, len - 8, person_keys[i]))
				return true;
		return false;
	}
	for (size_t i = 0; fixed_names[i]; i++)
		if (is_name(name, len, fixed_names[i]))
			return true;
	return false;
}

/* Copy len bytes of s into out as one printable line ('?' for others). */
static void printable_copy(char *out, size_t outsize, const char *s, size_t len)
{
	if (!outsize)
		return;
	size_t o = 0;
	for (size_t i = 0; i < len && o + 1 < outsize; i++) {
		unsigned char c = (unsigned char)s[i];
		out[o++] = (c >= 0x20 && c != 0x7f) ? (char)c : '?';
	}
	/* the excerpt is cut by bytes: never end inside a UTF-8 sequence (the
	 * text is quoted in a one-line reason that must stay valid UTF-8) */
	size_t k = o;
	while (k > 0 && ((unsigned char)out[k - 1] & 0xc0) == 0x80)
		k--;
	if (k > 0 && ((unsigned char)out[k - 1] & 0xc0) == 0xc0) {
		unsigned char lead = (unsigned char)out[k - 1];
		size_t want = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : 2;
		if (o - (k - 1) < want)
			o = k - 1;
	}
	out[o] = '\0';
}

static const char *find2(const char *s, size_t len, char c)
{
	for (size_t i = 0; i + 1 < len; i++)
		if (s[i] == c && s[i + 1] == c)
			return s + i;
	return NULL;
}

enum rd_tpl_check rd_tpl_check(const char *s, size_t len, char *bad, size_t badsize)
{
	const char *p = s, *end = s + len;
	if (badsize)
		bad[0] = '\0';
	while (p < end) {
		const char *open = find2(p, (size_t)(end - p), '{');
		if (!open)
			return RD_TPL_OK;
		const char *in = open + 2;
		const char *close = find2(in, (size_t)(end - in), '}');
		if (!close) {
			size_t n = (size_t)(end - open);
			printable_copy(bad, badsize, open, n > 40 ? 40 : n);
			return RD_TPL_UNTERMINATED;
		}
		const char *a = in, *b = close;
		while (a < b && (*a == ' ' || *a == '\t'))
			a++;
		while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
			b--;
		if (!rd_tpl_known(a, (size_t)(b - a))) {
			printable_copy(bad, badsize, open, (size_t)(close + 2 - open));
			return RD_TPL_UNKNOWN;
		}
		p = close + 2;
	}
	return RD_TPL_OK;
}

/* ---- headers ---- */

char *rd_tpl_header_clean(char *s)
{
	for (unsigned char *p = (unsigned char *)s; *p; p++)
		if (*p < 0x20 || *p == 0x7f)
			*p = ' ';
	return s;
}

static bool addr_char_ok(unsigned char c)
{
	if (c <= 0x20 || c >= 0x7f)
		return false;
	return !strchr("()<>[]:;\\,\"", c);
}

bool rd_tpl_addr_ok(const char *addr)
{
	if (!addr)
		return false;
	size_t len = strlen(addr);
	if (len < 3 || len > 254)
		return false;
	const char *at = strchr(addr, '@');
	if (!at || at == addr || strchr(at + 1, '@') || at[1] == '\0')
		return false;
	for (size_t i = 0; i < len; i++)
		if (!addr_char_ok((unsigned char)addr[i]) && addr[i] != '@')
			return false;
	return true;
}

static void trim_copy(char *out, size_t outsize, const char *s, size_t len)
{
	while (len && (*s == ' ' || *s == '\t')) {
		s++;
		len--;
	}
	while (len && (s[len - 1] == ' ' || s[len - 1] == '\t'))
		len--;
	if (len >= outsize)
		len = outsize - 1;
	memcpy(out, s, len);
	out[len] = '\0';
}

bool rd_tpl_parse_mailbox(const char *in, char *name, size_t namesize, char *addr, size_t addrsize)
{
	if (!in || !namesize || !addrsize)
		return false;
	name[0] = addr[0] = '\0';
	const char *lt = strrchr(in, '<');
	if (!lt) {
		trim_copy(addr, addrsize, in, strlen(in));
		return rd_tpl_addr_ok(addr);
	}
	const char *gt = strchr(lt, '>');
	if (!gt)
		return false;
	trim_copy(addr, addrsize, lt + 1, (size_t)(gt - lt - 1));
	if (!rd_tpl_addr_ok(addr))
		return false;
	char tmp[512];
	trim_copy(tmp, sizeof(tmp), in, (size_t)(lt - in));
	size_t n = strlen(tmp), o = 0;
	const char *p = tmp;
	if (n >= 2 && tmp[0] == '"' && tmp[n - 1] == '"') {
		tmp[n - 1] = '\0';
		p = tmp + 1;
	}
	for (; *p && o + 1 < namesize; p++) {
		if (*p == '\\' && p[1])
			p++;
		name[o++] = *p;
	}
	name[o] = '\0';
	rd_tpl_header_clean(name);
	return true;
}

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* base64 of n bytes into out (no terminator); returns characters written */
static size_t b64_encode(const unsigned char *s, size_t n, char *out)
{
	size_t o = 0, i = 0;
	for (; i + 2 < n; i += 3) {
		unsigned v = (unsigned)s[i] << 16 | (unsigned)s[i + 1] << 8 | s[i + 2];
		out[o++] = b64[v >> 18 & 63];
		out[o++] = b64[v >> 12 & 63];
		out[o++] = b64[v >> 6 & 63];
		out[o++] = b64[v & 63];
	}
	if (i < n) {
		unsigned v = (unsigned)s[i] << 16 | (i + 1 < n ? (unsigned)s[i + 1] << 8 : 0);
		out[o++] = b64[v >> 18 & 63];
		out[o++] = b64[v >> 12 & 63];
		out[o++] = i + 1 < n ? b64[v >> 6 & 63] : '=';
		out[o++] = '=';
	}
	return o;
}

/* Output buffer with overflow tracking. */
struct obuf {
	char *p;
	size_t size, len;
	bool overflow;
};

static void oput(struct obuf *o, const char *s, size_t n)
{
	if (o->overflow || o->len + n + 1 > o->size) {
		o->overflow = true;
		return;
	}
	memcpy(o->p + o->len, s, n);
	o->len += n;
	o->p[o->len] = '\0';
}

static void oputs(struct obuf *o, const char *s)
{
	oput(o, s, strlen(s));
}

/* 42 input bytes = 56 base64 characters: an encoded word of 68, so that
 * "Subject: " plus one word stays within 78 characters. */
#define EW_BYTES 42

/* Encoded words for s (cleaned UTF-8), separated by CRLF SP. */
static void encoded_words(struct obuf *o, const char *s, size_t n)
{
	const unsigned char *u = (const unsigned char *)s;
	size_t i = 0;
	bool first = true;
	if (n == 0) {
		oputs(o, "=?UTF-8?B?"
			 "?=");
		return;
	}
	while (i < n) {
		size_t k = n - i < EW_BYTES ? n - i : EW_BYTES;
		/* do not split a UTF-8 sequence: back off to a lead byte */
		if (i + k < n) {
			size_t j = k;
			while (j > 0 && (u[i + j] & 0xC0) == 0x80)
				j--;
			if (j > 0)
				k = j;
		}
		char enc[64];
		size_t e = b64_encode(u + i, k, enc);
		if (!first)
			oputs(o, "\r\n ");
		oputs(o, "=?UTF-8?B?");
		oput(o, enc, e);
		oputs(o, "?=");
		first = false;
		i += k;
	}
}

static bool plain_ascii(const char *s)
{
	for (const unsigned char *p = (const unsigned char *)s; *p; p++)
		if (*p < 0x20 || *p >= 0x7f)
			return false;
	return strstr(s, "=?") == NULL;
}

size_t rd_tpl_encode_text(const char *field, const char *value, char *out, size_t outsize)
{
	struct obuf o = {out, outsize, 0, outsize == 0};
	if (outsize)
		out[0] = '\0';
	char *v = rd_xstrdup(value ? value : "");
	rd_tpl_header_clean(v);
	size_t n = strlen(v);
	/* a plain line may be long (RFC 5322: 998), folding is optional */
	if (plain_ascii(v) && strlen(field) + 2 + n <= 998)
		oput(&o, v, n);
	else
		encoded_words(&o, v, n);
	free(v);
	return o.overflow ? 0 : o.len;
}

/* Longest display name written as a plain or quoted phrase: quoted with
 * every character escaped (2 x 300 + 2) plus " <" address (254) ">" and
 * "Reply-To: " stays within 998 characters. */
#define MAILBOX_PLAIN_MAX 300

/* RFC 5322 atext plus space: a phrase that needs no quoting */
static bool phrase_atoms(const char *s)
{
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if ((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
		    (*p >= '0' && *p <= '9') || *p == ' ')
			continue;
		if (!strchr("!#$%&'*+-/=?^_`{|}~", *p))
			return false;
	}
	return true;
}

size_t rd_tpl_encode_mailbox(const char *name, const char *addr, char *out, size_t outsize)
{
	struct obuf o = {out, outsize, 0, outsize == 0};
	if (outsize)
		out[0] = '\0';
	char *nm = rd_xstrdup(name ? name : "");
	rd_tpl_header_clean(nm);
	char t[1024];
	trim_copy(t, sizeof(t), nm, strlen(nm));
	free(nm);
	if (t[0]) {
		/* a long ASCII name quoted (up to twice its length with escapes)
		 * plus " <addr>" could exceed the 998-character line limit
		 * (found by fuzz_template): encoded words fold instead */
		if (!plain_ascii(t) || strlen(t) > MAILBOX_PLAIN_MAX) {
			encoded_words(&o, t, strlen(t));
		} else if (phrase_atoms(t)) {
			oputs(&o, t);
		} else {
			oputs(&o, "\"");
			for (const char *p = t; *p; p++) {
				if (*p == '"' || *p == '\\')
					oputs(&o, "\\");
				oput(&o, p, 1);
			}
			oputs(&o, "\"");
		}
		oputs(&o, " <");
		oputs(&o, addr);
		oputs(&o, ">");
	} else {
		oputs(&o, addr);
	}
	return o.overflow ? 0 : o.len;
}

/* ---- message ---- */

bool rd_tpl_msgid_ok(const char *id)
{
	if (!id)
		return false;
	size_t n = strlen(id);
	if (n < 5 || n > 250 || id[0] != '<' || id[n - 1] != '>')
		return false;
	const char *at = NULL;
	for (size_t i = 1; i + 1 < n; i++) {
		unsigned char c = (unsigned char)id[i];
		if (c <= 0x20 || c >= 0x7f || c == '<' || c == '>')
			return false;
		if (c == '@') {
			if (at)
				return false;
			at = id + i;
		}
	}
	return at && at > id + 1 && at < id + n - 2;
}

/* A growing string. */
struct sbuf {
	char *p;
	size_t len, cap;
};

static void sput(struct sbuf *b, const char *s, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 1024;
		while (b->len + n + 1 > cap)
			cap *= 2;
		b->p = rd_xrealloc(b->p, cap);
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static void sputs(struct sbuf *b, const char *s)
{
	sput(b, s, strlen(s));
}

void rd_tpl_qp(const char *s, size_t n, char **buf, size_t *len, size_t *cap)
{
	static const char hex[] = "0123456789ABCDEF";
	struct sbuf b = {*buf, *len, *cap};
	size_t col = 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '\r' && i + 1 < n && s[i + 1] == '\n') {
			sput(&b, "\r\n", 2);
			col = 0;
			i++;
			continue;
		}
		char tok[3];
		size_t tl;
		bool eol = i + 1 >= n || (s[i + 1] == '\r' && i + 2 < n && s[i + 2] == '\n');
		if ((c >= 33 && c <= 126 && c != '=') || ((c == ' ' || c == '\t') && !eol)) {
			tok[0] = (char)c;
			tl = 1;
		} else {
			tok[0] = '=';
			tok[1] = hex[c >> 4];
			tok[2] = hex[c & 15];
			tl = 3;
		}
		/* 76 characters per line at most, the soft break's '=' included */
		if (col + tl > 75) {
			sput(&b, "=\r\n", 3);
			col = 0;
		}
		sput(&b, tok, tl);
		col += tl;
	}
	*buf = b.p;
	*len = b.len;
	*cap = b.cap;
}

static void rfc5322_date(int64_t ms, char *out, size_t outsize)
{
	static const char *const wd[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
	static const char *const mo[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
					 "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
	time_t t = (time_t)(ms / 1000);
	struct tm tm;
	/* a time outside struct tm's range (year beyond INT_MAX) leaves tm
	 * unset: fall back to the epoch rather than print garbage */
	if (!gmtime_r(&t, &tm) || tm.tm_year < -1900 || tm.tm_year > 9999 - 1900) {
		t = 0;
		gmtime_r(&t, &tm);
	}
	snprintf(out, outsize, "%s, %d %s %04d %02d:%02d:%02d +0000", wd[tm.tm_wday % 7],
		 tm.tm_mday, mo[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min,
		 tm.tm_sec);
}

static void header(struct sbuf *b, const char *name, const char *value)
{
	sputs(b, name);
	sputs(b, ": ");
	sputs(b, value);
	sputs(b, "\r\n");
}

enum rd_status rd_tpl_build(const struct rd_tpl_mail *m, char **out, size_t *outlen,
			    struct rd_err *err)
{
	*out = NULL;
	*outlen = 0;
	if (!rd_tpl_addr_ok(m->from_addr))
		return rd_errf(err, RD_REJECT, "no usable From address (org.configured mail_from)");
	if (!rd_tpl_addr_ok(m->to_addr))
		return rd_errf(err, RD_REJECT, "unusable recipient address");
	if (!rd_tpl_msgid_ok(m->message_id))
		return rd_errf(err, RD_REJECT, "unusable Message-ID");

	struct sbuf b = {0};
	/* a mailbox: display name up to 1000 bytes, encoded (x 4/3 + folds) */
	size_t hsize = 8192;
	char *h = rd_xmalloc(hsize);
	char date[64];
	rfc5322_date(m->date_ms, date, sizeof(date));
	header(&b, "Date", date);
	if (!rd_tpl_encode_mailbox(m->from_name, m->from_addr, h, hsize))
		rd_tpl_encode_mailbox(NULL, m->from_addr, h, hsize);
	header(&b, "From", h);
	if (!rd_tpl_encode_mailbox(m->to_name, m->to_addr, h, hsize))
		rd_tpl_encode_mailbox(NULL, m->to_addr, h, hsize);
	header(&b, "To", h);
	/* an unusable reply_to only costs the Reply-To header, not the mail */
	if (m->reply_addr && m->reply_addr[0] && rd_tpl_addr_ok(m->reply_addr)) {
		if (!rd_tpl_encode_mailbox(m->reply_name, m->reply_addr, h, hsize))
			rd_tpl_encode_mailbox(NULL, m->reply_addr, h, hsize);
		header(&b, "Reply-To", h);
	}
	/* the subject may be long (placeholders): size the buffer for it */
	size_t slen = m->subject ? strlen(m->subject) : 0;
	size_t need = slen * 2 + (slen / EW_BYTES + 2) * 16 + 64;
	if (need > hsize) {
		free(h);
		hsize = need;
		h = rd_xmalloc(hsize);
	}
	rd_tpl_encode_text("Subject", m->subject, h, hsize);
	header(&b, "Subject", h);
	free(h);
	header(&b, "Message-ID", m->message_id);
	header(&b, "MIME-Version", "1.0");
	header(&b, "Content-Type", "text/plain; charset=utf-8");

	/* the body with CRLF line ends, NUL dropped, ending with CRLF */
	const char *s = m->body ? m->body : "";
	size_t n = strlen(s);
	struct sbuf body = {0};
	sput(&body, "", 0);
	bool seven = true;
	for (size_t i = 0; i < n;) {
		/* one line: copied at once (a call per byte was the largest
		 * symbol of the mail workers' own CPU) */
		size_t start = i;
		while (i < n && s[i] != '\r' && s[i] != '\n') {
			unsigned char c = (unsigned char)s[i++];
			if (c >= 0x80 || (c < 0x20 && c != '\t') || c == 0x7f)
				seven = false;
		}
		if (i - start > 76)
			seven = false;
		sput(&body, s + start, i - start);
		if (i < n) {
			if (s[i] == '\r' && i + 1 < n && s[i + 1] == '\n')
				i++;
			i++;
			sput(&body, "\r\n", 2);
		}
	}
	if (body.len < 2 || memcmp(body.p + body.len - 2, "\r\n", 2) != 0)
		sput(&body, "\r\n", 2);
	header(&b, "Content-Transfer-Encoding", seven ? "7bit" : "quoted-printable");
	header(&b, "Auto-Submitted", "auto-generated");
	sputs(&b, "\r\n");
	if (seven)
		sput(&b, body.p, body.len);
	else
		rd_tpl_qp(body.p, body.len, &b.p, &b.len, &b.cap);
	free(body.p);
	*out = b.p;
	*outlen = b.len;
	return RD_OK;
}

/* ---- retries ---- */

int64_t rd_tpl_backoff_ms(int64_t base_ms, int n)
{
	const int64_t cap = INT64_MAX / 4;
	if (base_ms <= 0)
		return 0;
	if (n < 1)
		n = 1;
	int shift = n - 1;
	if (shift >= 62 || base_ms > (cap >> shift))
		return cap;
	return base_ms << shift;
}

bool rd_tpl_next_attempt(int64_t now_ms, int64_t window_ms, int attempts, int64_t base_ms,
			 int64_t lifetime_s, int64_t *next_ms)
{
	int64_t end = window_ms + lifetime_s * 1000;
	if (now_ms >= end)
		return false;
	int64_t delay = rd_tpl_backoff_ms(base_ms, attempts);
	int64_t next = delay > end - now_ms ? end : now_ms + delay;
	*next_ms = next;
	return true;
}
