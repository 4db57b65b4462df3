/* fuzz_template.c: libFuzzer target for the template parser and the mail
 * builder of daemon/template.c: rd_tpl_check (placeholder grammar),
 * rd_tpl_parse_mailbox (mail_from / reply_to as configured), header
 * encoding (rd_tpl_encode_text, rd_tpl_encode_mailbox) and rd_tpl_build
 * (the full RFC 5322 message text).
 *
 * The input is split at NUL bytes into fields: template text, from
 * mailbox, reply-to mailbox, to name, to address, subject, body,
 * Message-ID, 8 bytes of date. Checked invariants (a violation aborts):
 *  - rd_tpl_check: the excerpt is one printable line, within its buffer,
 *    valid UTF-8 whenever the template was;
 *  - a parsed mailbox has a usable address and a name without controls;
 *  - encoded header values are printable 7-bit ASCII, lines folded only as
 *    CRLF SP, no line over 998 characters (encoded words: 78);
 *  - a built message is 7-bit, CR only in CRLF, no line over 998, its
 *    header block contains only the headers the builder writes (nothing
 *    from a field can start a header line), and it ends with CRLF. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"
#include "template.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NFIELDS 9

static void check_header_value(const char *s, size_t n, size_t first_col, size_t max_line)
{
	size_t col = first_col;
	if (strlen(s) != n)
		abort();
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '\r') {
			/* only a fold: CRLF then a blank */
			if (i + 2 >= n || s[i + 1] != '\n' || (s[i + 2] != ' ' && s[i + 2] != '\t'))
				abort();
			i++;
			col = 0;
			continue;
		}
		if (c < 0x20 || c >= 0x7f)
			abort();
		if (++col > max_line)
			abort();
	}
}

static const char *const headers[] = {
    "Date: ",	       "From: ",		      "To: ",
    "Reply-To: ",      "Subject: ",		      "Message-ID: ",
    "MIME-Version: ",  "Content-Type: ",	      "Content-Transfer-Encoding: ",
    "Auto-Submitted: ", NULL,
};

static void check_message(const char *m, size_t n)
{
	size_t col = 0;
	bool in_head = true, line_start = true;
	if (n < 4 || memcmp(m + n - 2, "\r\n", 2) != 0)
		abort();
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)m[i];
		if (line_start && in_head) {
			if (c == '\r') {
				in_head = false; /* the blank line ends the header block */
			} else if (c != ' ' && c != '\t') {
				bool known = false;
				for (size_t h = 0; headers[h]; h++)
					if (!strncmp(m + i, headers[h], strlen(headers[h])))
						known = true;
				if (!known)
					abort();
			}
		}
		line_start = false;
		if (c == '\r') {
			if (i + 1 >= n || m[i + 1] != '\n')
				abort();
			i++;
			col = 0;
			line_start = true;
			continue;
		}
		if (c == '\n' || c == 0 || c >= 0x80)
			abort();
		if (++col > 998)
			abort();
	}
	if (in_head)
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	/* split at NUL into NFIELDS strings (missing fields are "") */
	char *buf = malloc(size + 1);
	char *f[NFIELDS];
	size_t flen[NFIELDS];
	size_t k = 0, start = 0;
	if (!buf)
		return 0;
	memcpy(buf, data, size);
	buf[size] = '\0';
	for (size_t i = 0; i <= size && k < NFIELDS; i++) {
		if (i == size || buf[i] == '\0') {
			f[k] = buf + start;
			flen[k] = i - start;
			k++;
			start = i + 1;
		}
	}
	for (; k < NFIELDS; k++) {
		f[k] = buf + size;
		flen[k] = 0;
	}

	/* placeholders: the template is the whole input (NULs and all) */
	char bad[48];
	enum rd_tpl_check ck = rd_tpl_check((const char *)data, size, bad, sizeof(bad));
	if (ck != RD_TPL_OK && ck != RD_TPL_UNKNOWN && ck != RD_TPL_UNTERMINATED)
		abort();
	size_t bl = strnlen(bad, sizeof(bad));
	if (bl >= sizeof(bad))
		abort();
	if (ck == RD_TPL_OK && bl)
		abort();
	if (ck != RD_TPL_OK && bl < 2) /* at least the "{{" */
		abort();
	for (size_t i = 0; i < bl; i++)
		if ((unsigned char)bad[i] < 0x20 || bad[i] == 0x7f)
			abort();
	if (rd_utf8_valid((const char *)data, size) && !rd_utf8_valid(bad, bl))
		abort();
	/* a tiny excerpt buffer is never overrun */
	char tiny[3];
	(void)rd_tpl_check(f[0], flen[0], tiny, sizeof(tiny));
	if (strnlen(tiny, sizeof(tiny)) >= sizeof(tiny))
		abort();

	/* mailboxes as configured */
	char from_name[256], from_addr[256], reply_name[256], reply_addr[256];
	bool from_ok = rd_tpl_parse_mailbox(f[1], from_name, sizeof(from_name), from_addr,
					    sizeof(from_addr));
	bool reply_ok = rd_tpl_parse_mailbox(f[2], reply_name, sizeof(reply_name), reply_addr,
					     sizeof(reply_addr));
	if (from_ok) {
		if (!rd_tpl_addr_ok(from_addr))
			abort();
		for (const char *p = from_name; *p; p++)
			if ((unsigned char)*p < 0x20 || *p == 0x7f)
				abort();
	}
	if (!reply_ok)
		reply_name[0] = reply_addr[0] = '\0';

	/* header encoding */
	char out[16384];
	size_t n = rd_tpl_encode_text("Subject", f[5], out, sizeof(out));
	if (n)
		check_header_value(out, n, strlen("Subject: "), 998);
	n = rd_tpl_encode_text("Subject", f[5], out, 16);
	if (n >= 16 || strnlen(out, 16) >= 16)
		abort();
	if (rd_tpl_addr_ok(f[4])) {
		n = rd_tpl_encode_mailbox(f[3], f[4], out, sizeof(out));
		if (n)
			check_header_value(out, n, strlen("To: "), 998);
		n = rd_tpl_encode_mailbox(f[3], f[4], out, 8);
		if (n >= 8 || strnlen(out, 8) >= 8)
			abort();
	}

	/* the message */
	int64_t date_ms = 0;
	if (flen[8] >= sizeof(date_ms))
		memcpy(&date_ms, f[8], sizeof(date_ms));
	struct rd_tpl_mail m = {
	    .from_name = from_ok ? from_name : "",
	    .from_addr = from_ok ? from_addr : "info@example.org",
	    .reply_name = reply_name,
	    .reply_addr = reply_addr,
	    .to_name = f[3],
	    .to_addr = f[4],
	    .subject = f[5],
	    .body = f[6],
	    .message_id = f[7],
	    .date_ms = date_ms,
	};
	char *msg = NULL;
	size_t msglen = 0;
	struct rd_err err = {.st = RD_OK, .msg = ""};
	enum rd_status st = rd_tpl_build(&m, &msg, &msglen, &err);
	if (st == RD_OK) {
		if (!msg || strlen(msg) != msglen)
			abort();
		check_message(msg, msglen);
	} else {
		size_t el = strlen(err.msg);
		if (msg || st != RD_REJECT || el == 0 || strchr(err.msg, '\n'))
			abort();
	}
	free(msg);
	free(buf);
	return 0;
}
