/* test_template.c: the pure mail logic of daemon/template.c: placeholder
 * validation, header encoding (RFC 2047, phrases) and injection attempts,
 * the message text, quoted-printable bodies, the back-off schedule. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "template.h"

#define NF(a) (sizeof(a) / sizeof((a)[0]))

/* ---- placeholders ---- */

static void test_known_placeholders(void **state)
{
	(void)state;
	static const struct {
		const char *name;
		bool known;
	} cases[] = {
	    {"contact.first_name", true},
	    {"contact.last_name", true},
	    {"contact.email", true},
	    {"contact.company", true},
	    {"contact.language", true},
	    {"contact.phone", true},
	    {"contact.street", true},
	    {"contact.zip", true},
	    {"contact.city", true},
	    {"contact.country", true},
	    {"contact.birthdate", true},
	    {"contact.fields.diet", true},
	    {"contact.fields.a b", true},
	    {"booking.number", true},
	    {"booking.total", true},
	    {"offer.title", true},
	    {"offer.starts_at", true},
	    {"invoice.number", true},
	    {"invoice.amount", true},
	    {"invoice.due", true},
	    {"payment.amount", true},
	    {"vars.anything", true},
	    {"vars.x.y", true},
	    {"contact.nickname", false},
	    {"contact.fields.", false},
	    {"contact.fields", false},
	    {"contact.", false},
	    {"contact", false},
	    {"vars.", false},
	    {"vars", false},
	    {"booking.id", false},
	    {"booking.numbers", false},
	    {"Booking.number", false},
	    {"invoice.amount ", false},
	    {"", false},
	    {"payment.method", false},
	    {"contact.fields.a}b", false},
	    {"vars.{x", false},
	    {"org.name", false},
	    {"contact.first_name.x", false},
	};
	for (size_t i = 0; i < NF(cases); i++) {
		bool got = rd_tpl_known(cases[i].name, strlen(cases[i].name));
		if (got != cases[i].known)
			fail_msg("rd_tpl_known(\"%s\") = %d, want %d", cases[i].name, got,
				 cases[i].known);
	}
}

static void test_check_templates(void **state)
{
	(void)state;
	static const struct {
		const char *text;
		enum rd_tpl_check want;
		const char *bad;
	} cases[] = {
	    {"no placeholders at all", RD_TPL_OK, ""},
	    {"Hello {{contact.first_name}}!", RD_TPL_OK, ""},
	    {"Hello {{ contact.first_name }} {{\tbooking.number\t}}", RD_TPL_OK, ""},
	    {"{{vars.a}}{{vars.b}}", RD_TPL_OK, ""},
	    {"single { braces } and }} alone", RD_TPL_OK, ""},
	    {"Hi {{contact.nickname}}, {{contact.first_name}}", RD_TPL_UNKNOWN,
	     "{{contact.nickname}}"},
	    {"{{contact.first_name}} then {{ oops }}", RD_TPL_UNKNOWN, "{{ oops }}"},
	    {"{{}}", RD_TPL_UNKNOWN, "{{}}"},
	    {"{{{contact.first_name}}}", RD_TPL_UNKNOWN, "{{{contact.first_name}}"},
	    {"open {{contact.first_name", RD_TPL_UNTERMINATED, "{{contact.first_name"},
	    {"{{contact.first_name}} and {{", RD_TPL_UNTERMINATED, "{{"},
	    {"{{a\nb}}", RD_TPL_UNKNOWN, "{{a?b}}"},
	};
	for (size_t i = 0; i < NF(cases); i++) {
		char bad[64] = "x";
		enum rd_tpl_check got =
		    rd_tpl_check(cases[i].text, strlen(cases[i].text), bad, sizeof(bad));
		if (got != cases[i].want || strcmp(bad, cases[i].bad) != 0)
			fail_msg("case %zu \"%s\": got %d \"%s\", want %d \"%s\"", i, cases[i].text,
				 got, bad, cases[i].want, cases[i].bad);
	}
	/* the reported name is cut, never overflows */
	char big[300];
	memset(big, 'x', sizeof(big));
	memcpy(big, "{{", 2);
	memcpy(big + sizeof(big) - 2, "}}", 2);
	char bad[16];
	assert_int_equal(rd_tpl_check(big, sizeof(big), bad, sizeof(bad)), RD_TPL_UNKNOWN);
	assert_int_equal(strlen(bad), sizeof(bad) - 1);
	/* cut inside a UTF-8 sequence (found by fuzz_decode): the excerpt ends
	 * before the character, so the reason stays valid UTF-8 */
	const char *u = "{{ab\xc3\xbc\xc3\xbc";
	char ub[5]; /* room for "{{ab" + half of the first u-umlaut */
	assert_int_equal(rd_tpl_check(u, strlen(u), ub, sizeof(ub)), RD_TPL_UNTERMINATED);
	assert_string_equal(ub, "{{ab");
	char ub2[7]; /* "{{ab" + one whole character */
	assert_int_equal(rd_tpl_check(u, strlen(u), ub2, sizeof(ub2)), RD_TPL_UNTERMINATED);
	assert_string_equal(ub2, "{{ab\xc3\xbc");
}

/* ---- headers ---- */

static int b64val(char c)
{
	const char *t = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	const char *p = strchr(t, c);
	return p && c ? (int)(p - t) : -1;
}

/* Decode a header value made of encoded words and plain text (test
 * helper: the inverse of rd_tpl_encode_text), checking the folding. */
static char *decode_header(const char *field, const char *v)
{
	char *out = calloc(1, strlen(v) + 1);
	size_t o = 0;
	size_t col = strlen(field) + 2;
	const char *p = v;
	while (*p) {
		if (p[0] == '\r') {
			assert_true(p[1] == '\n' && p[2] == ' ');
			assert_true(col <= 78);
			col = 0;
			p += 2; /* the SP after the fold is part of the next line */
			p++;
			col = 1;
			continue;
		}
		if (strncmp(p, "=?UTF-8?B?", 10) == 0) {
			const char *e = strstr(p + 10, "?=");
			assert_non_null(e);
			assert_true(e + 2 - p <= 75);
			unsigned acc = 0;
			int bits = 0;
			for (const char *q = p + 10; q < e; q++) {
				if (*q == '=')
					break;
				int d = b64val(*q);
				assert_true(d >= 0);
				acc = acc << 6 | (unsigned)d;
				bits += 6;
				if (bits >= 8) {
					bits -= 8;
					out[o++] = (char)(acc >> bits & 0xff);
				}
			}
			col += (size_t)(e + 2 - p);
			p = e + 2;
			continue;
		}
		assert_true((unsigned char)*p >= 0x20 && (unsigned char)*p < 0x7f);
		out[o++] = *p++;
		col++;
	}
	assert_true(col <= 998);
	out[o] = '\0';
	return out;
}

static void test_header_clean(void **state)
{
	(void)state;
	char s[] = "Hi\r\nBcc: evil@example.org\0tail";
	rd_tpl_header_clean(s);
	assert_string_equal(s, "Hi  Bcc: evil@example.org");
	char t[] = "a\tb\x01\x7f"
		   "c";
	assert_string_equal(rd_tpl_header_clean(t), "a b  c");
}

static void test_encode_text(void **state)
{
	(void)state;
	static const char *const values[] = {
	    "Booking N-1",
	    "Bestätigung für Zoë",
	    "日本語のテキスト、とても長い件名で折り返しが必要です。日本語のテキスト、とても長い件"
	    "名",
	    "=?UTF-8?B?Zm9v?= looks encoded",
	    "emoji 😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀 end",
	    "",
	};
	for (size_t i = 0; i < NF(values); i++) {
		char out[4096];
		size_t n = rd_tpl_encode_text("Subject", values[i], out, sizeof(out));
		assert_true(n > 0 || values[i][0] == '\0');
		char *back = decode_header("Subject", out);
		assert_string_equal(back, values[i]);
		free(back);
		for (size_t k = 0; out[k]; k++)
			assert_true((unsigned char)out[k] < 0x80);
	}
	char out[256];
	rd_tpl_encode_text("Subject", "Booking N-1", out, sizeof(out));
	assert_string_equal(out, "Booking N-1"); /* ASCII stays readable */
	rd_tpl_encode_text("Subject", "=?x?", out, sizeof(out));
	assert_non_null(strstr(out, "=?UTF-8?B?")); /* lookalikes are encoded */
	/* too small a buffer: 0, never an overflow */
	assert_int_equal(rd_tpl_encode_text("Subject", "Bestätigung für Zoë", out, 12), 0);
}

/* Every way a value could try to start a header line. */
static void test_injection_attempts(void **state)
{
	(void)state;
	static const char *const evil[] = {
	    "x\r\nBcc: victim@example.org", "x\nBcc: victim@example.org",
	    "x\rBcc: victim@example.org",   "x\r\n\r\nbody injected",
	    "ü\r\nBcc: victim@example.org", "\r\n.\r\nMAIL FROM:<x@y>",
	};
	for (size_t i = 0; i < NF(evil); i++) {
		char out[1024];
		rd_tpl_encode_text("Subject", evil[i], out, sizeof(out));
		/* a CR or LF only ever as the start of a fold "\r\n " */
		for (char *p = out; *p; p++) {
			if (*p == '\r')
				assert_true(p[1] == '\n' && p[2] == ' ');
			if (*p == '\n')
				assert_true(p > out && p[-1] == '\r' && p[1] == ' ');
		}
		rd_tpl_encode_mailbox(evil[i], "a@b.example", out, sizeof(out));
		for (char *p = out; *p; p++) {
			if (*p == '\r')
				assert_true(p[1] == '\n' && p[2] == ' ');
			if (*p == '\n')
				assert_true(p[-1] == '\r' && p[1] == ' ');
		}
		/* and in a whole message: the header block has exactly our fields */
		struct rd_tpl_mail m = {.from_name = evil[i],
					.from_addr = "info@acme.example",
					.to_name = evil[i],
					.to_addr = "anna@example.org",
					.reply_addr = "office@acme.example",
					.subject = evil[i],
					.body = evil[i],
					.message_id = "<1.abc@acme.example>",
					.date_ms = 0};
		char *text;
		size_t len;
		struct rd_err err;
		assert_int_equal(rd_tpl_build(&m, &text, &len, &err), RD_OK);
		char *end = strstr(text, "\r\n\r\n");
		assert_non_null(end);
		int fields = 0;
		for (char *p = text; p < end + 2; p++) {
			if (p == text || (p[-1] == '\n' && *p != ' ' && *p != '\t'))
				fields++;
			if (*p == '\n')
				assert_true(p[-1] == '\r');
		}
		/* Date From To Reply-To Subject Message-ID MIME-Version
		 * Content-Type Content-Transfer-Encoding Auto-Submitted */
		assert_int_equal(fields, 10);
		*end = '\0'; /* the header block only: the body may say anything */
		assert_null(strstr(text, "\nBcc:"));
		assert_null(strstr(text, "\nMAIL FROM"));
		free(text);
	}
	/* addresses with CR, LF, spaces or brackets are refused outright */
	static const char *const bad_addr[] = {"a@b\r\nBcc: c@d", "a b@c", "<a@b>", "a@b>x",
					       "a@b\n",		  "ab",	   "@b",    "a@",
					       "a@b@c",		  "a\"@b"};
	for (size_t i = 0; i < NF(bad_addr); i++)
		if (rd_tpl_addr_ok(bad_addr[i]))
			fail_msg("address \"%s\" accepted", bad_addr[i]);
	assert_true(rd_tpl_addr_ok("anna.m+x@example.org"));
}

static void test_encode_mailbox(void **state)
{
	(void)state;
	char out[512];
	rd_tpl_encode_mailbox("", "a@b.example", out, sizeof(out));
	assert_string_equal(out, "a@b.example");
	rd_tpl_encode_mailbox(NULL, "a@b.example", out, sizeof(out));
	assert_string_equal(out, "a@b.example");
	rd_tpl_encode_mailbox("Anna Muster", "a@b.example", out, sizeof(out));
	assert_string_equal(out, "Anna Muster <a@b.example>");
	rd_tpl_encode_mailbox("Muster, Anna \"AM\"", "a@b.example", out, sizeof(out));
	assert_string_equal(out, "\"Muster, Anna \\\"AM\\\"\" <a@b.example>");
	rd_tpl_encode_mailbox("Zoë Müller", "z@b.example", out, sizeof(out));
	assert_string_equal(out, "=?UTF-8?B?Wm/DqyBNw7xsbGVy?= <z@b.example>");
}

static void test_parse_mailbox(void **state)
{
	(void)state;
	static const struct {
		const char *in, *name, *addr;
		bool ok;
	} cases[] = {
	    {"info@acme.example", "", "info@acme.example", true},
	    {"  info@acme.example ", "", "info@acme.example", true},
	    {"Acme Kurse <info@acme.example>", "Acme Kurse", "info@acme.example", true},
	    {"\"Acme, Inc\" <x@acme.example>", "Acme, Inc", "x@acme.example", true},
	    {"\"A \\\"q\\\"\" <x@y.example>", "A \"q\"", "x@y.example", true},
	    {"Nobody <>", "", "", false},
	    {"no address", "", "", false},
	    {"", "", "", false},
	    {"Broken <x@y.example", "", "", false},
	};
	for (size_t i = 0; i < NF(cases); i++) {
		char name[64], addr[64];
		bool ok = rd_tpl_parse_mailbox(cases[i].in, name, sizeof(name), addr, sizeof(addr));
		if (ok != cases[i].ok ||
		    (ok && (strcmp(name, cases[i].name) != 0 || strcmp(addr, cases[i].addr) != 0)))
			fail_msg("\"%s\": got %d \"%s\" \"%s\"", cases[i].in, ok, name, addr);
	}
}

static void test_msgid(void **state)
{
	(void)state;
	assert_true(rd_tpl_msgid_ok("<42.0a1b2c3d4e5f@acme.example>"));
	assert_false(rd_tpl_msgid_ok("42@acme.example"));
	assert_false(rd_tpl_msgid_ok("<42@acme.example>\r\nBcc: x@y"));
	assert_false(rd_tpl_msgid_ok("<4 2@acme.example>"));
	assert_false(rd_tpl_msgid_ok("<@acme.example>"));
	assert_false(rd_tpl_msgid_ok("<42@>"));
	assert_false(rd_tpl_msgid_ok(NULL));
}

/* ---- message ---- */

static char *qp_decode(const char *s)
{
	char *out = calloc(1, strlen(s) + 1);
	size_t o = 0;
	for (const char *p = s; *p;) {
		if (p[0] == '=' && p[1] == '\r' && p[2] == '\n') {
			p += 3;
		} else if (p[0] == '=') {
			char h[3] = {p[1], p[2], 0};
			out[o++] = (char)strtol(h, NULL, 16);
			p += 3;
		} else {
			out[o++] = *p++;
		}
	}
	return out;
}

static void test_build_message(void **state)
{
	(void)state;
	char longline[300];
	memset(longline, 'a', sizeof(longline) - 1);
	longline[sizeof(longline) - 1] = '\0';
	char body[1024];
	snprintf(body, sizeof(body), "Grüezi Zoë\nbare cr\rtrailing space \n=equals\n%s\nend",
		 longline);
	struct rd_tpl_mail m = {.from_name = "Acme Kurse",
				.from_addr = "info@acme.example",
				.to_name = "Zoë Müller",
				.to_addr = "zoe@example.org",
				.reply_addr = "office@acme.example",
				.subject = "Bestätigung",
				.body = body,
				.message_id = "<7.abcdef@acme.example>",
				.date_ms = 1700000000000LL};
	char *text;
	size_t len;
	struct rd_err err;
	assert_int_equal(rd_tpl_build(&m, &text, &len, &err), RD_OK);
	assert_int_equal(strlen(text), len);
	assert_non_null(strstr(text, "Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"));
	assert_non_null(strstr(text, "From: Acme Kurse <info@acme.example>\r\n"));
	assert_non_null(strstr(text, "To: =?UTF-8?B?"));
	assert_non_null(strstr(text, "Reply-To: office@acme.example\r\n"));
	assert_non_null(strstr(text, "Subject: =?UTF-8?B?"));
	assert_non_null(strstr(text, "Message-ID: <7.abcdef@acme.example>\r\n"));
	assert_non_null(strstr(text, "MIME-Version: 1.0\r\n"));
	assert_non_null(strstr(text, "Content-Type: text/plain; charset=utf-8\r\n"));
	assert_non_null(strstr(text, "Content-Transfer-Encoding: quoted-printable\r\n"));
	/* every line: CRLF, at most 78 characters, ASCII */
	for (char *p = text; *p; p++) {
		assert_true((unsigned char)*p < 0x80);
		if (*p == '\n')
			assert_true(p[-1] == '\r');
	}
	char *b = strstr(text, "\r\n\r\n") + 4;
	for (char *line = b; *line;) {
		char *e = strstr(line, "\r\n");
		assert_non_null(e);
		assert_true(e - line <= 76);
		line = e + 2;
	}
	char *dec = qp_decode(b);
	char want[1024];
	snprintf(want, sizeof(want),
		 "Grüezi Zoë\r\nbare cr\r\ntrailing space \r\n=equals\r\n%s\r\nend\r\n", longline);
	assert_string_equal(dec, want);
	free(dec);
	free(text);

	/* short ASCII lines: 7bit, the body as it is */
	m.body = "Hello Anna\n\n.see you\n";
	m.subject = "Booking";
	m.to_name = "";
	m.reply_addr = NULL;
	assert_int_equal(rd_tpl_build(&m, &text, &len, &err), RD_OK);
	assert_non_null(strstr(text, "Content-Transfer-Encoding: 7bit\r\n"));
	assert_non_null(strstr(text, "\r\n\r\nHello Anna\r\n\r\n.see you\r\n"));
	assert_non_null(strstr(text, "To: zoe@example.org\r\n"));
	assert_null(strstr(text, "Reply-To"));
	free(text);

	/* unusable addresses or Message-ID: a permanent failure */
	m.to_addr = "not an address";
	assert_int_equal(rd_tpl_build(&m, &text, &len, &err), RD_REJECT);
	assert_null(text);
	m.to_addr = "zoe@example.org";
	m.from_addr = "";
	assert_int_equal(rd_tpl_build(&m, &text, &len, &err), RD_REJECT);
	assert_non_null(strstr(err.msg, "From"));
	m.from_addr = "info@acme.example";
	m.message_id = "<x\r\ny@z>";
	assert_int_equal(rd_tpl_build(&m, &text, &len, &err), RD_REJECT);
}

/* Found by fuzz_template: a long ASCII display name written as a plain or
 * quoted phrase made a header line over 998 characters. And a Date outside
 * the years 0000-9999 is not RFC 5322: such a time prints the epoch. */
static void test_long_name_and_date(void **state)
{
	(void)state;
	char name[1000];
	memset(name, '^', sizeof(name) - 1); /* atext: a plain phrase */
	name[sizeof(name) - 1] = '\0';
	char out[8192];
	size_t n = rd_tpl_encode_mailbox(name, "a@b.example", out, sizeof(out));
	assert_true(n > 0);
	assert_non_null(strstr(out, "=?UTF-8?B?"));
	for (char *line = out; *line;) {
		char *e = strstr(line, "\r\n");
		size_t l = e ? (size_t)(e - line) : strlen(line);
		assert_true(l + strlen("Reply-To: ") <= 998);
		line = e ? e + 2 : line + l;
	}
	/* 300 characters still go as a plain phrase */
	name[300] = '\0';
	rd_tpl_encode_mailbox(name, "a@b.example", out, sizeof(out));
	assert_int_equal(out[0], '^');

	struct rd_tpl_mail m = {.from_addr = "info@acme.example",
				.to_addr = "zoe@example.org",
				.subject = "s",
				.body = "b",
				.message_id = "<7.abcdef@acme.example>",
				.date_ms = INT64_MAX};
	char *text;
	size_t len;
	struct rd_err err;
	assert_int_equal(rd_tpl_build(&m, &text, &len, &err), RD_OK);
	assert_non_null(strstr(text, "Date: Thu, 1 Jan 1970 00:00:00 +0000\r\n"));
	free(text);
	m.date_ms = INT64_MIN;
	assert_int_equal(rd_tpl_build(&m, &text, &len, &err), RD_OK);
	assert_non_null(strstr(text, "Date: Thu, 1 Jan 1970 00:00:00 +0000\r\n"));
	free(text);
}

/* ---- retries ---- */

static void test_backoff(void **state)
{
	(void)state;
	assert_int_equal(rd_tpl_backoff_ms(60000, 1), 60000);
	assert_int_equal(rd_tpl_backoff_ms(60000, 2), 120000);
	assert_int_equal(rd_tpl_backoff_ms(60000, 3), 240000);
	assert_int_equal(rd_tpl_backoff_ms(60000, 10), 60000LL << 9);
	assert_int_equal(rd_tpl_backoff_ms(200, 0), 200);
	assert_int_equal(rd_tpl_backoff_ms(200, 1000), INT64_MAX / 4); /* saturates */
	assert_int_equal(rd_tpl_backoff_ms(86400000, 62), INT64_MAX / 4);
	for (int n = 1; n < 80; n++)
		assert_true(rd_tpl_backoff_ms(1, n + 1) >= rd_tpl_backoff_ms(1, n));

	int64_t next;
	/* within the window: now + base * 2^(n-1) */
	assert_true(rd_tpl_next_attempt(1000000, 0, 1, 60000, 432000, &next));
	assert_int_equal(next, 1060000);
	assert_true(rd_tpl_next_attempt(1000000, 0, 3, 60000, 432000, &next));
	assert_int_equal(next, 1240000);
	/* the last attempt is at the end of the window, not after it */
	assert_true(rd_tpl_next_attempt(400000000, 0, 20, 60000, 432000, &next));
	assert_int_equal(next, 432000000);
	/* the window is over: give up */
	assert_false(rd_tpl_next_attempt(432000000, 0, 21, 60000, 432000, &next));
	assert_false(rd_tpl_next_attempt(500000000, 0, 1, 60000, 432000, &next));
	/* a window opened by a manual retry */
	assert_true(rd_tpl_next_attempt(500000000, 499000000, 1, 60000, 432000, &next));
	assert_int_equal(next, 500060000);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_known_placeholders), cmocka_unit_test(test_check_templates),
	    cmocka_unit_test(test_header_clean),       cmocka_unit_test(test_encode_text),
	    cmocka_unit_test(test_injection_attempts), cmocka_unit_test(test_encode_mailbox),
	    cmocka_unit_test(test_parse_mailbox),      cmocka_unit_test(test_msgid),
	    cmocka_unit_test(test_build_message),      cmocka_unit_test(test_backoff),
	    cmocka_unit_test(test_long_name_and_date),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
