/* test_csv_import.c: the CSV import decoder (handlers/csv_import.c): header
 * mapping, CSV quoting, the byte order mark, refused rows with their
 * reasons, file-level refusals, normalisation by the message validator
 * (email trimmed and lower-cased, "" not given, custom fields), lock keys,
 * and stopping early. Each case is a CSV text and the rows it must give,
 * rendered as one line per row: "<row> <payload JSON>" or "<row> ! <reason>". */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "csv_import.h"

struct out {
	char text[4096];
	int stop_after; /* 0: never */
	int rows;
};

static int render(const struct rd_csv_row *r, void *arg)
{
	struct out *o = arg;
	size_t n = strlen(o->text);
	if (r->reason) {
		snprintf(o->text + n, sizeof(o->text) - n, "%ld ! %s\n", r->row, r->reason);
	} else {
		char *p = json_dumps(r->payload, JSON_COMPACT | JSON_SORT_KEYS);
		char *k = json_dumps(r->keys, JSON_COMPACT);
		snprintf(o->text + n, sizeof(o->text) - n, "%ld %s %s\n", r->row, p, k);
		free(p);
		free(k);
	}
	o->rows++;
	return o->stop_after && o->rows >= o->stop_after;
}

static const struct {
	const char *csv;
	const char *want; /* rows, or "E:" and the start of the file-level error */
} cases[] = {
    {"email,first_name\nAda@Example.ORG ,Ada\n",
     "1 {\"email\":\"ada@example.org\",\"first_name\":\"Ada\",\"match\":\"email\"} "
     "[\"email:ada@example.org\"]\n"},
    /* quoting, doubled quotes, embedded comma and newline, CRLF, BOM */
    {"\xEF\xBB\xBF"
     "Email,Company\r\n\"b@x.org\",\"A \"\"B\"\", C\nD\"\r\n",
     "1 {\"company\":\"A \\\"B\\\", C\\nD\",\"email\":\"b@x.org\",\"match\":\"email\"} "
     "[\"email:b@x.org\"]\n"},
    /* "" is not given; custom fields, an empty one is nil (not given) */
    {"email,phone,fields.size,fields.diet\nc@x.org,,M,\n",
     "1 {\"email\":\"c@x.org\",\"fields\":{\"size\":\"M\"},\"match\":\"email\"} "
     "[\"email:c@x.org\"]\n"},
    /* an implausible email: dropped and explained, no lock key */
    {"email,last_name\nnot an email,Z\n",
     "1 {\"email_given\":\"not an email\",\"email_invalid\":\"contains space or control "
     "character\",\"last_name\":\"Z\",\"match\":\"email\"} []\n"},
    /* refused rows keep their numbers; the file goes on */
    {"email,zip\na@x.org,1,2\n,\nb@x.org,3\n",
     "1 ! row 1 has 3 cells, the header has 2\n2 ! row 2 is empty\n"
     "3 {\"email\":\"b@x.org\",\"match\":\"email\",\"zip\":\"3\"} [\"email:b@x.org\"]\n"},
    /* the validator's reasons */
    /* (a person value's content, e.g. a birthdate, is checked by SQL) */
    {"email,birthdate\nd@x.org,1999-02-30\n",
     "1 {\"birthdate\":\"1999-02-30\",\"email\":\"d@x.org\",\"match\":\"email\"} "},
    {"email,first_name\ne@x.org,\xFF\n", "1 ! row 1: data.first_name: "},
    /* file-level refusals */
    {"", "E:no header row"},
    {"email,shoe\n", "E:header: unknown column \"shoe\""},
    {"email,EMAIL\n", "E:header: column \"email\" appears twice"},
    {"email,fields.\n", "E:header: column 2: a custom field needs a key"},
    {"email\n\"a@b.c\n", "E:CSV record 2: "},
    {"email\na\"b@c.d\n", "E:CSV record 2: "},
};

static void test_cases(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct out o = {.text = ""};
		struct rd_err err = {.st = RD_OK, .msg = ""};
		enum rd_status st =
		    rd_csv_import_decode(cases[i].csv, strlen(cases[i].csv), render, &o, &err);
		const char *want = cases[i].want;
		if (strncmp(want, "E:", 2) == 0) {
			if (st != RD_REJECT || strncmp(err.msg, want + 2, strlen(want + 2)) != 0)
				fail_msg("case %zu: want error \"%s\", got %d \"%s\"", i, want + 2,
					 st, err.msg);
			continue;
		}
		if (st != RD_OK)
			fail_msg("case %zu: %s", i, err.msg);
		if (strncmp(o.text, want, strlen(want)) != 0)
			fail_msg("case %zu:\nwant %s\ngot  %s", i, want, o.text);
	}
}

static void test_stop(void **state)
{
	(void)state;
	const char *csv = "email\na@x.org\nb@x.org\nc@x.org\n";
	struct out o = {.text = "", .stop_after = 2};
	struct rd_err err = {.st = RD_OK, .msg = ""};
	assert_int_equal(rd_csv_import_decode(csv, strlen(csv), render, &o, &err), RD_OK);
	assert_int_equal(o.rows, 2);
}

static void test_no_trailing_newline(void **state)
{
	(void)state;
	const char *csv = "email\na@x.org";
	struct out o = {.text = ""};
	struct rd_err err = {.st = RD_OK, .msg = ""};
	assert_int_equal(rd_csv_import_decode(csv, strlen(csv), render, &o, &err), RD_OK);
	assert_int_equal(o.rows, 1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_cases),
	    cmocka_unit_test(test_stop),
	    cmocka_unit_test(test_no_trailing_newline),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
