/* test_handlers.c: the message-type table and the generic payload validator
 * (handlers/handlers.c, handlers/payload.c): table order, required keys of
 * every type, person rules, email normalisation, money, dates, currencies,
 * lock keys, and the normalised payloads themselves.
 *
 * Data maps are written as JSON with ' for " and "$markers" for what JSON
 * cannot say (see pack_marker; the helper is the one of test_decode.c). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"
#include "handlers.h"

/* ---- JSON with markers -> MessagePack (same helper in test_handlers.c) ---- */

static void pack_be(msgpack_packer *pk, uint64_t v, int n)
{
	unsigned char b[8];
	for (int i = n - 1; i >= 0; i--) {
		b[i] = (unsigned char)(v & 0xff);
		v >>= 8;
	}
	msgpack_pack_ext_body(pk, b, (size_t)n);
}

static void pack_marker(msgpack_packer *pk, const char *s)
{
	long long a, b;
	unsigned n;
	char ch;
	float f;

	if (!strcmp(s, "$u64max")) {
		msgpack_pack_uint64(pk, UINT64_MAX);
	} else if (!strcmp(s, "$i64min")) {
		msgpack_pack_int64(pk, INT64_MIN);
	} else if (!strcmp(s, "$nan")) {
		msgpack_pack_double(pk, NAN);
	} else if (!strcmp(s, "$inf")) {
		msgpack_pack_double(pk, INFINITY);
	} else if (!strcmp(s, "$badutf8")) {
		msgpack_pack_str_with_body(pk, "\xc3\x28", 2);
	} else if (!strcmp(s, "$surrogate")) {
		msgpack_pack_str_with_body(pk, "\xed\xa0\x80", 3);
	} else if (!strcmp(s, "$overlong")) {
		msgpack_pack_str_with_body(pk, "\xc0\xaf", 2);
	} else if (!strcmp(s, "$nul")) {
		msgpack_pack_str_with_body(pk, "a\0b", 3);
	} else if (sscanf(s, "$int:%lld", &a) == 1) {
		msgpack_pack_int64(pk, a);
	} else if (sscanf(s, "$f32:%f", &f) == 1) {
		msgpack_pack_float(pk, f);
	} else if (sscanf(s, "$ts4:%lld", &a) == 1) {
		msgpack_pack_ext(pk, 4, -1);
		pack_be(pk, (uint64_t)a, 4);
	} else if (sscanf(s, "$ts8:%lld:%lld", &a, &b) == 2) {
		msgpack_pack_ext(pk, 8, -1);
		pack_be(pk, ((uint64_t)b << 34) | (uint64_t)a, 8);
	} else if (sscanf(s, "$ts12:%lld:%lld", &a, &b) == 2) {
		msgpack_pack_ext(pk, 12, -1);
		pack_be(pk, (uint64_t)b, 4);
		pack_be(pk, (uint64_t)a, 8);
	} else if (sscanf(s, "$ext:%lld:%u", &a, &n) == 2) {
		char z[64] = {0};
		assert_true(n <= sizeof(z));
		msgpack_pack_ext_with_body(pk, z, n, (int8_t)a);
	} else if (sscanf(s, "$bin:%u", &n) == 1) {
		char z[64] = {0};
		assert_true(n <= sizeof(z));
		msgpack_pack_bin_with_body(pk, z, n);
	} else if (sscanf(s, "$rep:%u:%c", &n, &ch) == 2) {
		char *r = malloc(n ? n : 1);
		assert_non_null(r);
		memset(r, ch, n);
		msgpack_pack_str_with_body(pk, r, n);
		free(r);
	} else {
		fail_msg("unknown marker %s", s);
	}
}

static void pack_json(msgpack_packer *pk, const json_t *j)
{
	json_t *v;
	size_t i;

	switch (json_typeof(j)) {
	case JSON_OBJECT:
		msgpack_pack_map(pk, json_object_size(j));
		for (void *it = json_object_iter((json_t *)j); it;
		     it = json_object_iter_next((json_t *)j, it)) {
			const char *k = json_object_iter_key(it);
			const char *tilde = strchr(k, '~');
			v = json_object_iter_value(it);
			if (k[0] == '$')
				pack_marker(pk, k);
			else
				msgpack_pack_str_with_body(pk, k,
							   tilde ? (size_t)(tilde - k) : strlen(k));
			pack_json(pk, v);
		}
		break;
	case JSON_ARRAY:
		msgpack_pack_array(pk, json_array_size(j));
		for (i = 0; i < json_array_size(j); i++)
			pack_json(pk, json_array_get(j, i));
		break;
	case JSON_STRING:
		if (json_string_value(j)[0] == '$')
			pack_marker(pk, json_string_value(j));
		else
			msgpack_pack_str_with_body(pk, json_string_value(j), json_string_length(j));
		break;
	case JSON_INTEGER:
		msgpack_pack_int64(pk, json_integer_value(j));
		break;
	case JSON_REAL:
		msgpack_pack_double(pk, json_real_value(j));
		break;
	case JSON_TRUE:
		msgpack_pack_true(pk);
		break;
	case JSON_FALSE:
		msgpack_pack_false(pk);
		break;
	case JSON_NULL:
		msgpack_pack_nil(pk);
		break;
	}
}

/* ' -> " then parse; keys keep their order */
static json_t *qjson(const char *text)
{
	char *s = strdup(text);
	json_error_t e;
	json_t *j;

	assert_non_null(s);
	for (char *p = s; *p; p++)
		if (*p == '\'')
			*p = '"';
	j = json_loads(s, JSON_DECODE_ANY, &e);
	if (!j)
		fail_msg("bad test JSON (%s): %s", e.text, s);
	free(s);
	return j;
}

static void pack_qjson(msgpack_packer *pk, const char *text)
{
	json_t *j = qjson(text);
	pack_json(pk, j);
	json_decref(j);
}

/* ---- running the validator ---- */

#define C1 "6f1c2a3e-1111-4222-8333-944455556666"
#define C1U "6F1C2A3E-1111-4222-8333-944455556666"
#define C2 "0b5e7d10-aaaa-4bbb-8ccc-0123456789ab"

struct result {
	enum rd_status st;
	struct rd_err err;
	json_t *payload; /* owned */
	json_t *locks;	 /* owned, sorted */
};

static int str_cmp(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* A sorted copy of a JSON array of strings. */
static json_t *sorted(const json_t *a)
{
	size_t n = json_array_size(a), i;
	const char **v = calloc(n ? n : 1, sizeof(*v));
	json_t *out = json_array();

	assert_non_null(v);
	for (i = 0; i < n; i++)
		v[i] = json_string_value(json_array_get(a, i));
	qsort(v, n, sizeof(*v), str_cmp);
	for (i = 0; i < n; i++)
		json_array_append_new(out, json_string(v[i]));
	free(v);
	return out;
}

static void run(const char *type, const char *data, struct result *r)
{
	const struct rd_handler *h = rd_handler_find(type);
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_unpacked unp;
	size_t off = 0;

	memset(r, 0, sizeof(*r));
	if (!h)
		fail_msg("unknown type %s", type);
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	pack_qjson(&pk, data);
	msgpack_unpacked_init(&unp);
	assert_int_equal(msgpack_unpack_next(&unp, sb.data, sb.size, &off), MSGPACK_UNPACK_SUCCESS);
	r->st = rd_payload_build(h, &unp.data, &r->payload, &r->err);
	if (r->st == RD_OK) {
		json_t *keys = json_array();
		rd_payload_lock_keys(h, r->payload, keys);
		r->locks = sorted(keys);
		json_decref(keys);
	} else {
		assert_null(r->payload);
	}
	msgpack_unpacked_destroy(&unp);
	msgpack_sbuffer_destroy(&sb);
}

static void result_free(struct result *r)
{
	json_decref(r->payload);
	json_decref(r->locks);
	r->payload = r->locks = NULL;
}

static char *dump(const json_t *j)
{
	return j ? json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY) : strdup("null");
}

/* ---- the table ---- */

struct hcase {
	const char *name;
	const char *type;
	const char *data;
	enum rd_status want;
	const char *expect; /* RD_OK: the payload; else a substring of the reason */
	const char *locks;  /* RD_OK: the lock keys (any order), NULL: not checked */
};

#define OK(payload) RD_OK, payload
#define REJ(reason) RD_REJECT, reason, NULL
#define BOOK "'booking_id':'B1','version':1,'offer_id':'O1'"
#define INV "'invoice_id':'I1','currency':'CHF','booking_id':'B1'"

/* clang-format off */
static const struct hcase cases[] = {
	/* normalised payloads */
	{"booking normalised", "booking.created",
	 "{" BOOK ",'number':'B-42','status':'pending','total':10000,'currency':'CHF','notify':false,"
	 "'sync':true,'unknown':'ignored',"
	 "'booker':{'email':' Anna@Example.ORG ','first_name':'Anna','last_name':'','phone':null,"
	 "'contact_id':'" C1U "','shoe_size':44,"
	 "'fields':{'diet':'veg','age':42,'vip':true,'score':1.5,'gone':null,'empty':''}},"
	 "'attendees':[{'attendee_id':'A1','email':'b@x.org','price':5000,'category':'adult'},"
	 "{'attendee_id':'A2','email':'not-an-email','first_name':'Bo'}]}",
	 OK("{" BOOK ",'number':'B-42','status':'pending','total':10000,'currency':'CHF',"
	    "'notify':false,'sync':true,"
	    "'booker':{'email':'anna@example.org','first_name':'Anna','contact_id':'" C1 "',"
	    "'fields':{'diet':'veg','age':42,'vip':true,'score':1.5}},"
	    "'attendees':[{'attendee_id':'A1','email':'b@x.org','price':5000,'category':'adult'},"
	    "{'attendee_id':'A2','email_invalid':'no @','email_given':'not-an-email',"
	    "'first_name':'Bo'}]}"),
	 "['booking:B1','contact:" C1 "','email:anna@example.org','email:b@x.org']"},
	{"empty, nil and blank mean not given", "booking.updated",
	 "{" BOOK ",'booker':{'first_name':'','last_name':null,'email':'   ','company':'',"
	 "'fields':null},'currency':'','status':null,'attendees':null}",
	 OK("{" BOOK ",'booker':{}}"), "['booking:B1']"},
	{"booker contact_id not a uuid", "booking.created",
	 "{" BOOK ",'booker':{'contact_id':'c-17','email':'a@b.c'}}",
	 OK("{" BOOK ",'booker':{'contact_id_invalid':'c-17','email':'a@b.c'}}"),
	 "['booking:B1','email:a@b.c']"},
	{"country and birthdate kept as given", "booking.created",
	 "{" BOOK ",'booker':{'country':'Switzerland','birthdate':'31.12.1990','language':'fr-CH'}}",
	 OK("{" BOOK ",'booker':{'country':'Switzerland','birthdate':'31.12.1990',"
	    "'language':'fr-CH'}}"),
	 NULL},
	{"person strings of 1000 bytes", "booking.created",
	 "{" BOOK ",'booker':{'first_name':'$rep:1000:n'}}", RD_OK, NULL, NULL},
	{"float32 custom field", "booking.created",
	 "{" BOOK ",'booker':{'fields':{'h':'$f32:0.5','n':-3}}}",
	 OK("{" BOOK ",'booker':{'fields':{'h':0.5,'n':-3}}}"), NULL},
	{"attendee.updated", "attendee.updated",
	 "{'booking_id':'B1','version':7,'sync':false,'attendee':{'attendee_id':'A1',"
	 "'email':'C@D.E','contact_id':'" C2 "'}}",
	 OK("{'booking_id':'B1','version':7,'sync':false,'attendee':{'attendee_id':'A1',"
	    "'email':'c@d.e','contact_id':'" C2 "'}}"),
	 "['booking:B1','contact:" C2 "','email:c@d.e']"},
	{"booking.cancelled", "booking.cancelled",
	 "{'booking_id':'B1','version':3,'reason':'ill','notify':false}",
	 OK("{'booking_id':'B1','version':3,'reason':'ill','notify':false}"), "['booking:B1']"},
	{"offer starts_at timestamp", "offer.upserted",
	 "{'offer_id':'O1','title':'Yoga','starts_at':'$ts8:1700000000:250000000',"
	 "'currency':'EUR','email_change':'retain'}",
	 OK("{'offer_id':'O1','title':'Yoga','starts_at':1700000000250,'currency':'EUR',"
	    "'email_change':'retain'}"),
	 "[]"},
	{"offer starts_at int", "offer.upserted",
	 "{'offer_id':'O1','title':'Yoga','starts_at':1700000000000}",
	 OK("{'offer_id':'O1','title':'Yoga','starts_at':1700000000000}"), NULL},
	{"transaction signed amount", "transaction.recorded",
	 "{'transaction_id':'T1','contact_id':'" C1 "','amount':-500,'currency':'CHF',"
	 "'text':'Korrektur','date':'2024-02-29','vat_bp':0}",
	 OK("{'transaction_id':'T1','contact_id':'" C1 "','amount':-500,'currency':'CHF',"
	    "'text':'Korrektur','date':'2024-02-29','vat_bp':0}"),
	 "['contact:" C1 "']"},
	{"invoice on a contact", "invoice.issued",
	 "{'invoice_id':'I1','amount':12050,'currency':'CHF','contact_id':'" C1 "','vat_bp':810,"
	 "'due':'2025-12-31','number':'R-1','notify':true}",
	 OK("{'invoice_id':'I1','amount':12050,'currency':'CHF','contact_id':'" C1 "',"
	    "'vat_bp':810,'due':'2025-12-31','number':'R-1','notify':true}"),
	 "['contact:" C1 "','invoice:I1']"},
	{"invoice on a booking", "invoice.issued", "{" INV ",'amount':1}",
	 OK("{" INV ",'amount':1}"), "['booking:B1','invoice:I1']"},
	{"payment", "payment.recorded",
	 "{'payment_id':'P1','invoice_id':'I1','amount':100,'currency':'CHF','method':'twint'}",
	 OK("{'payment_id':'P1','invoice_id':'I1','amount':100,'currency':'CHF','method':'twint'}"),
	 "['invoice:I1']"},
	{"invoice.cancelled", "invoice.cancelled", "{'invoice_id':'I1'}", OK("{'invoice_id':'I1'}"),
	 "['invoice:I1']"},
	{"merge", "contact.merged", "{'keep':'" C1U "','drop':'" C2 "'}",
	 OK("{'keep':'" C1 "','drop':'" C2 "'}"), "['contact:" C1 "','contact:" C2 "']"},
	{"contact.upserted by email", "contact.upserted",
	 "{'email':'X@Y.Z','first_name':'Eva','match':'email','fields':{'k':'v'},'tags':['x']}",
	 OK("{'email':'x@y.z','first_name':'Eva','match':'email','fields':{'k':'v'}}"),
	 "['email:x@y.z']"},
	{"contact.upserted by id", "contact.upserted", "{'contact_id':'" C1U "','city':'Bern'}",
	 OK("{'contact_id':'" C1 "','city':'Bern'}"), "['contact:" C1 "']"},
	{"contact.upserted new", "contact.upserted", "{'last_name':'Muster','email':'x'}",
	 OK("{'last_name':'Muster','email_invalid':'no @','email_given':'x'}"), "[]"},
	{"tags", "contact.tagged", "{'contact_id':'" C1 "','add':['vip','','x'],'remove':[]}",
	 OK("{'contact_id':'" C1 "','add':['vip','x'],'remove':[]}"), "['contact:" C1 "']"},
	{"note", "contact.noted", "{'contact_id':'" C1 "','text':'called','author':'eva'}",
	 OK("{'contact_id':'" C1 "','text':'called','author':'eva'}"), NULL},
	{"erase", "contact.erased", "{'contact_id':'" C1 "'}", OK("{'contact_id':'" C1 "'}"),
	 "['contact:" C1 "']"},
	{"delete", "contact.deleted", "{'contact_id':'" C1 "'}", OK("{'contact_id':'" C1 "'}"),
	 "['contact:" C1 "']"},
	{"mail vars", "mail.requested",
	 "{'contact_id':'" C1 "','template':'reminder','vars':{'a':'1','b':null,'c':''}}",
	 OK("{'contact_id':'" C1 "','template':'reminder','vars':{'a':'1','c':''}}"),
	 "['contact:" C1 "']"},
	{"org", "org.configured",
	 "{'name':'Acme','sync_contacts':true,'language':'de','mail_from':'Acme <info@acme.ch>'}",
	 OK("{'name':'Acme','sync_contacts':true,'language':'de',"
	    "'mail_from':'Acme <info@acme.ch>'}"),
	 "[]"},
	{"field", "field.defined", "{'key':'birth','kind':'date','label':'Geburtstag'}",
	 OK("{'key':'birth','kind':'date','label':'Geburtstag'}"), NULL},
	{"template", "template.upserted",
	 "{'key':'invoice','language':'de','subject':'Rechnung','body':'$rep:100000:b'}", RD_OK,
	 NULL, NULL},

	/* persons */
	{"person string over 1000", "booking.created",
	 "{" BOOK ",'booker':{'first_name':'$rep:1001:n'}}",
	 REJ("data.booker.first_name: longer than 1000 bytes")},
	{"attendee string over 1000", "booking.created",
	 "{" BOOK ",'booker':{},'attendees':[{'attendee_id':'A1'},"
	 "{'attendee_id':'A2','last_name':'$rep:1001:n'}]}",
	 REJ("data.attendees[1].last_name: longer than 1000 bytes")},
	{"email over 1000", "booking.created", "{" BOOK ",'booker':{'email':'$rep:1001:e'}}",
	 REJ("data.booker.email: longer than 1000 bytes")},
	{"custom field over 1000", "booking.created",
	 "{" BOOK ",'booker':{'fields':{'x':'$rep:1001:e'}}}",
	 REJ("data.booker.fields.x: longer than 1000 bytes")},
	{"email is int", "booking.created", "{" BOOK ",'booker':{'email':5}}",
	 REJ("data.booker.email: want str, got int")},
	{"booker is str", "booking.created", "{" BOOK ",'booker':'anna'}",
	 REJ("data.booker: want map, got str")},
	{"booker is nil", "booking.created", "{" BOOK ",'booker':null}",
	 REJ("missing key: data.booker")},
	{"attendee price is str", "booking.created",
	 "{" BOOK ",'booker':{},'attendees':[{'attendee_id':'A'},{'attendee_id':'B'},"
	 "{'attendee_id':'C','price':'10'}]}",
	 REJ("data.attendees[2].price: want int, got str")},
	{"attendee price negative", "booking.created",
	 "{" BOOK ",'booker':{},'attendees':[{'attendee_id':'A','price':-1}]}",
	 REJ("data.attendees[0].price: must be >= 0")},
	{"attendee without id", "booking.created",
	 "{" BOOK ",'booker':{},'attendees':[{'email':'a@b.c'}]}",
	 REJ("missing key: data.attendees[0].attendee_id")},
	{"attendee ids repeat", "booking.created",
	 "{" BOOK ",'booker':{},'attendees':[{'attendee_id':'A'},{'attendee_id':'B'},"
	 "{'attendee_id':'A'}]}",
	 REJ("data.attendees[2].attendee_id: duplicate")},
	{"attendees not an array", "booking.created", "{" BOOK ",'booker':{},'attendees':{}}",
	 REJ("data.attendees: want array, got map")},
	{"attendee not a map", "booking.created", "{" BOOK ",'booker':{},'attendees':[1]}",
	 REJ("data.attendees[0]: want map, got int")},
	{"attendee.updated without attendee", "attendee.updated",
	 "{'booking_id':'B1','version':2,'attendee':{}}",
	 REJ("missing key: data.attendee.attendee_id")},
	{"fields value is a map", "booking.created", "{" BOOK ",'booker':{'fields':{'x':{}}}}",
	 REJ("data.booker.fields.x: want str, number, bool or nil, got map")},
	{"fields value NaN", "booking.created", "{" BOOK ",'booker':{'fields':{'x':'$nan'}}}",
	 REJ("data.booker.fields.x: not a finite number")},
	{"fields value inf", "contact.upserted", "{'fields':{'x':'$inf'}}",
	 REJ("data.fields.x: not a finite number")},
	{"fields value u64 max", "contact.upserted", "{'fields':{'x':'$u64max'}}",
	 REJ("data.fields.x: integer out of range")},
	{"fields empty key", "booking.created", "{" BOOK ",'booker':{'fields':{'':1}}}",
	 REJ("data.booker.fields: key #0 is empty")},
	{"fields int key", "booking.created", "{" BOOK ",'booker':{'fields':{'$int:3':1}}}",
	 REJ("data.booker.fields: key #0 is int, want str")},
	{"fields key invalid utf-8", "booking.created",
	 "{" BOOK ",'booker':{'fields':{'$badutf8':1}}}",
	 REJ("data.booker.fields: key #0: invalid UTF-8")},
	{"fields key too long", "contact.upserted", "{'fields':{'$rep:129:k':1}}",
	 REJ("data.fields: key #0 longer than 128 bytes")},
	{"fields is an array", "booking.created", "{" BOOK ",'booker':{'fields':[]}}",
	 REJ("data.booker.fields: want map, got array")},
	{"person string invalid utf-8", "booking.created",
	 "{" BOOK ",'booker':{'city':'$badutf8'}}", REJ("data.booker.city: invalid UTF-8")},
	{"person string with NUL", "booking.created", "{" BOOK ",'booker':{'zip':'$nul'}}",
	 REJ("data.booker.zip: contains a NUL character")},
	{"booker contact_id too long", "booking.created",
	 "{" BOOK ",'booker':{'contact_id':'$rep:129:c'}}",
	 REJ("data.booker.contact_id: longer than 128 bytes")},

	/* money */
	{"invoice amount 0", "invoice.issued", "{" INV ",'amount':0}", REJ("data.amount: must be > 0")},
	{"invoice amount negative", "invoice.issued", "{" INV ",'amount':-5}",
	 REJ("data.amount: must be > 0")},
	{"payment amount 0", "payment.recorded",
	 "{'payment_id':'P','invoice_id':'I','amount':0,'currency':'CHF'}",
	 REJ("data.amount: must be > 0")},
	{"payment amount negative", "payment.recorded",
	 "{'payment_id':'P','invoice_id':'I','amount':-1,'currency':'CHF'}",
	 REJ("data.amount: must be > 0")},
	{"amount float", "invoice.issued", "{" INV ",'amount':12.5}",
	 REJ("data.amount: want int, got float")},
	{"amount str", "invoice.issued", "{" INV ",'amount':'100'}",
	 REJ("data.amount: want int, got str")},
	{"amount over int64", "invoice.issued", "{" INV ",'amount':'$u64max'}",
	 REJ("data.amount: integer out of range")},
	{"transaction amount over int64", "transaction.recorded",
	 "{'transaction_id':'T','contact_id':'" C1 "','amount':'$u64max','currency':'CHF',"
	 "'text':'x'}",
	 REJ("data.amount: integer out of range")},
	{"invoice without booking or contact", "invoice.issued",
	 "{'invoice_id':'I1','amount':1,'currency':'CHF'}",
	 REJ("data: booking_id or contact_id is required")},
	{"invoice with blank booking", "invoice.issued",
	 "{'invoice_id':'I1','amount':1,'currency':'CHF','booking_id':'','contact_id':null}",
	 REJ("data: booking_id or contact_id is required")},
	{"repeated key: the first wins", "invoice.issued", "{" INV ",'amount':1,'currency~':'chf'}",
	 RD_OK, NULL, NULL}, /* the decoder rejects repeats before this */
	{"currency chf", "payment.recorded",
	 "{'payment_id':'P','invoice_id':'I','amount':1,'currency':'chf'}",
	 REJ("data.currency: want three upper-case letters (ISO 4217)")},
	{"currency CH", "payment.recorded",
	 "{'payment_id':'P','invoice_id':'I','amount':1,'currency':'CH'}",
	 REJ("data.currency: want three upper-case letters")},
	{"currency CHFX", "payment.recorded",
	 "{'payment_id':'P','invoice_id':'I','amount':1,'currency':'CHFX'}",
	 REJ("data.currency: want three upper-case letters")},
	{"currency C1F", "payment.recorded",
	 "{'payment_id':'P','invoice_id':'I','amount':1,'currency':'C1F'}",
	 REJ("data.currency: want three upper-case letters")},
	{"currency int", "payment.recorded",
	 "{'payment_id':'P','invoice_id':'I','amount':1,'currency':756}",
	 REJ("data.currency: want str, got int")},
	{"booking currency bad", "booking.created", "{" BOOK ",'booker':{},'currency':'Fr.'}",
	 REJ("data.currency: want three upper-case letters")},
	{"total negative", "booking.created", "{" BOOK ",'booker':{},'total':-1}",
	 REJ("data.total: must be >= 0")},
	{"vat_bp negative", "invoice.issued", "{" INV ",'amount':1,'vat_bp':-1}",
	 REJ("data.vat_bp: must be >= 0")},

	/* dates and instants */
	{"due 2025-02-30", "invoice.issued", "{" INV ",'amount':1,'due':'2025-02-30'}",
	 REJ("data.due: want a real date as YYYY-MM-DD")},
	{"due 2023-02-29", "invoice.issued", "{" INV ",'amount':1,'due':'2023-02-29'}",
	 REJ("data.due: want a real date")},
	{"due 1900-02-29", "invoice.issued", "{" INV ",'amount':1,'due':'1900-02-29'}",
	 REJ("data.due: want a real date")},
	{"due 2000-02-29", "invoice.issued", "{" INV ",'amount':1,'due':'2000-02-29'}", RD_OK, NULL,
	 NULL},
	{"due 2025-13-01", "invoice.issued", "{" INV ",'amount':1,'due':'2025-13-01'}",
	 REJ("data.due: want a real date")},
	{"due 2025-04-31", "invoice.issued", "{" INV ",'amount':1,'due':'2025-04-31'}",
	 REJ("data.due: want a real date")},
	{"due 2025-1-01", "invoice.issued", "{" INV ",'amount':1,'due':'2025-1-01'}",
	 REJ("data.due: want a real date")},
	{"due 0000-01-01", "invoice.issued", "{" INV ",'amount':1,'due':'0000-01-01'}",
	 REJ("data.due: want a real date")},
	{"due with time", "invoice.issued", "{" INV ",'amount':1,'due':'2025-01-01T00:00'}",
	 REJ("data.due: want a real date")},
	{"due is int", "invoice.issued", "{" INV ",'amount':1,'due':20250101}",
	 REJ("data.due: want str, got int")},
	{"transaction date bad", "transaction.recorded",
	 "{'transaction_id':'T','contact_id':'" C1 "','amount':1,'currency':'CHF','text':'x',"
	 "'date':'2025-02-29'}",
	 REJ("data.date: want a real date")},
	{"starts_at str", "offer.upserted", "{'offer_id':'O','title':'T','starts_at':'tomorrow'}",
	 REJ("data.starts_at: want int or timestamp, got str")},
	{"starts_at u64 max", "offer.upserted", "{'offer_id':'O','title':'T','starts_at':'$u64max'}",
	 REJ("data.starts_at: integer out of range")},
	{"starts_at bad ext", "offer.upserted", "{'offer_id':'O','title':'T','starts_at':'$ext:1:4'}",
	 REJ("data.starts_at: want int or timestamp, got ext type 1")},

	/* enums, bools, ints */
	{"status unknown", "booking.created", "{" BOOK ",'booker':{},'status':'done'}",
	 REJ("data.status: want one of confirmed, pending, waitlist, cancelled")},
	{"status int", "booking.created", "{" BOOK ",'booker':{},'status':1}",
	 REJ("data.status: want str, got int")},
	{"email_change unknown", "offer.upserted",
	 "{'offer_id':'O','title':'T','email_change':'keep'}",
	 REJ("data.email_change: want one of reassign, retain")},
	{"kind unknown", "field.defined", "{'key':'k','kind':'blob'}",
	 REJ("data.kind: want one of text, number, date, bool, file")},
	{"match unknown", "contact.upserted", "{'match':'phone'}", REJ("data.match: want one of email")},
	{"notify str", "booking.cancelled", "{'booking_id':'B','version':1,'notify':'yes'}",
	 REJ("data.notify: want bool, got str")},
	{"sync int", "attendee.updated",
	 "{'booking_id':'B','version':1,'attendee':{'attendee_id':'A'},'sync':1}",
	 REJ("data.sync: want bool, got int")},
	{"version 0", "booking.cancelled", "{'booking_id':'B','version':0}",
	 REJ("data.version: must be > 0")},
	{"version negative", "booking.created", "{'booking_id':'B1','version':-1,'offer_id':'O1','booker':{}}",
	 REJ("data.version: must be > 0")},
	{"version float", "booking.cancelled", "{'booking_id':'B','version':1.0}",
	 REJ("data.version: want int, got float")},

	/* strings and lists */
	{"booking_id int", "booking.cancelled", "{'booking_id':5,'version':1}",
	 REJ("data.booking_id: want str, got int")},
	{"booking_id too long", "booking.cancelled", "{'booking_id':'$rep:129:b','version':1}",
	 REJ("data.booking_id: longer than 128 bytes")},
	{"contact_id not a uuid", "contact.erased", "{'contact_id':'c-17'}",
	 REJ("data.contact_id: want a UUID")},
	{"keep is drop", "contact.merged", "{'keep':'" C1 "','drop':'" C1U "'}",
	 REJ("data: keep and drop are the same contact")},
	{"title too long", "offer.upserted", "{'offer_id':'O','title':'$rep:1001:t'}",
	 REJ("data.title: longer than 1000 bytes")},
	{"note too long", "contact.noted", "{'contact_id':'" C1 "','text':'$rep:10001:t'}",
	 REJ("data.text: longer than 10000 bytes")},
	{"note with NUL", "contact.noted", "{'contact_id':'" C1 "','text':'$nul'}",
	 REJ("data.text: contains a NUL character")},
	{"template body too long", "template.upserted",
	 "{'key':'k','language':'de','subject':'s','body':'$rep:100001:b'}",
	 REJ("data.body: longer than 100000 bytes")},
	{"template subject with newline", "template.upserted",
	 "{'key':'k','language':'de','subject':'Hi\\nBcc: x@y.z','body':'b'}",
	 REJ("data.subject: contains a control character")},
	{"language too long", "template.upserted",
	 "{'key':'k','language':'$rep:36:l','subject':'s','body':'b'}",
	 REJ("data.language: longer than 35 bytes")},
	{"tag not a str", "contact.tagged", "{'contact_id':'" C1 "','add':['a',1]}",
	 REJ("data.add[1]: want str, got int")},
	{"tag nil", "contact.tagged", "{'contact_id':'" C1 "','remove':[null]}",
	 REJ("data.remove[0]: want str, got nil")},
	{"tag too long", "contact.tagged", "{'contact_id':'" C1 "','add':['$rep:201:t']}",
	 REJ("data.add[0]: longer than 200 bytes")},
	{"tags not a list", "contact.tagged", "{'contact_id':'" C1 "','add':'vip'}",
	 REJ("data.add: want array, got str")},
	{"vars value int", "mail.requested", "{'contact_id':'" C1 "','template':'t','vars':{'a':1}}",
	 REJ("data.vars.a: want str, got int")},
	{"vars not a map", "mail.requested", "{'contact_id':'" C1 "','template':'t','vars':['a']}",
	 REJ("data.vars: want map, got array")},
	{"vars empty key", "mail.requested", "{'contact_id':'" C1 "','template':'t','vars':{'':'a'}}",
	 REJ("data.vars: key #0 is empty")},
};
/* clang-format on */

#define NCASES (sizeof(cases) / sizeof(cases[0]))

static void run_case(void **state)
{
	const struct hcase *c = *state;
	struct result r;
	char *got = NULL, *want = NULL, *got_locks = NULL, *want_locks = NULL;
	bool same = true, same_locks = true;

	run(c->type, c->data, &r);
	if (getenv("RD_TEST_VERBOSE"))
		print_message("%-36s %s %s\n", c->name, rd_status_name(r.st), r.err.msg);
	if (r.st == RD_OK && c->want == RD_OK && c->expect) {
		json_t *w = qjson(c->expect);
		same = json_equal(w, r.payload);
		got = dump(r.payload);
		want = dump(w);
		json_decref(w);
	}
	if (r.st == RD_OK && c->want == RD_OK && c->locks) {
		json_t *w = qjson(c->locks), *ws = sorted(w);
		same_locks = json_equal(ws, r.locks);
		got_locks = dump(r.locks);
		want_locks = dump(ws);
		json_decref(w);
		json_decref(ws);
	}
	result_free(&r);

	if (r.st != c->want)
		fail_msg("%s: got %s (%s)", c->name, rd_status_name(r.st), r.err.msg);
	if (!same)
		fail_msg("%s: payload\n  got  %s\n  want %s", c->name, got, want);
	if (!same_locks)
		fail_msg("%s: locks\n  got  %s\n  want %s", c->name, got_locks, want_locks);
	free(got);
	free(want);
	free(got_locks);
	free(want_locks);
	if (r.st != RD_OK) {
		assert_int_equal(r.err.st, r.st);
		if (c->expect && !strstr(r.err.msg, c->expect))
			fail_msg("%s: reason \"%s\" lacks \"%s\"", c->name, r.err.msg, c->expect);
		assert_true(rd_utf8_valid(r.err.msg, strlen(r.err.msg)));
	}
}

/* ---- every type: its minimal data passes; each required key is needed ---- */

/* clang-format off */
static const struct {
	const char *type;
	const char *data;
} minimal[] = {
	{"attendee.updated", "{'booking_id':'B1','version':2,'attendee':{'attendee_id':'A1'}}"},
	{"booking.cancelled", "{'booking_id':'B1','version':3}"},
	{"booking.created", "{" BOOK ",'booker':{'email':'a@x.org'}}"},
	{"booking.updated", "{" BOOK ",'booker':{}}"},
	{"contact.deleted", "{'contact_id':'" C1 "'}"},
	{"contact.erased", "{'contact_id':'" C1 "'}"},
	{"contact.merged", "{'keep':'" C1 "','drop':'" C2 "'}"},
	{"contact.noted", "{'contact_id':'" C1 "','text':'called'}"},
	{"contact.tagged", "{'contact_id':'" C1 "'}"},
	{"contact.upserted", "{}"},
	{"field.defined", "{'key':'shirt','kind':'text'}"},
	{"invoice.cancelled", "{'invoice_id':'I1'}"},
	{"invoice.issued", "{" INV ",'amount':12050}"},
	{"mail.requested", "{'contact_id':'" C1 "','template':'reminder'}"},
	{"offer.upserted", "{'offer_id':'O1','title':'Yoga'}"},
	{"org.configured", "{'name':'Acme'}"},
	{"payment.recorded", "{'payment_id':'P1','invoice_id':'I1','amount':100,'currency':'CHF'}"},
	{"template.upserted", "{'key':'booking_confirmation','language':'de','subject':'Hallo',"
			      "'body':'Hi {{contact.first_name}}'}"},
	{"transaction.recorded", "{'transaction_id':'T1','contact_id':'" C1 "','amount':-500,"
				 "'currency':'CHF','text':'Korrektur'}"},
};

/* clang-format on */

#define NMIN (sizeof(minimal) / sizeof(minimal[0]))

static void check_required(void **state)
{
	const char *type = minimal[(size_t)(uintptr_t)*state].type;
	const char *data = minimal[(size_t)(uintptr_t)*state].data;
	const struct rd_handler *h = rd_handler_find(type);
	struct result r;
	char *text;
	json_t *j;

	assert_non_null(h);
	run(type, data, &r);
	if (r.st != RD_OK)
		fail_msg("%s: minimal data rejected: %s", type, r.err.msg);
	result_free(&r);

	for (size_t i = 0; i < h->nfields; i++) {
		const struct rd_field *f = &h->fields[i];
		static const char *const blanks[] = {NULL, "null", "''"};
		char want[160];

		if (!(f->flags & RD_FF_REQUIRED))
			continue;
		snprintf(want, sizeof(want), "missing key: data.%s", f->key);
		for (size_t b = 0; b < 3; b++) {
			j = qjson(data);
			if (!json_object_get(j, f->key))
				fail_msg("%s: minimal data lacks required %s", type, f->key);
			if (blanks[b])
				json_object_set_new(j, f->key, qjson(blanks[b]));
			else
				json_object_del(j, f->key);
			text = json_dumps(j, JSON_COMPACT);
			json_decref(j);
			run(type, text, &r);
			free(text);
			result_free(&r);
			if (r.st != RD_REJECT || strcmp(r.err.msg, want) != 0)
				fail_msg("%s without %s (%s): got %s \"%s\"", type, f->key,
					 blanks[b] ? blanks[b] : "absent", rd_status_name(r.st),
					 r.err.msg);
		}
	}
}

/* ---- the table itself ---- */

/* clang-format off */
static const char *const spec_types[] = {
	"org.configured",    "offer.upserted",  "template.upserted", "field.defined",
	"contact.upserted",  "contact.tagged",  "contact.noted",     "contact.merged",
	"contact.erased",    "contact.deleted", "booking.created",   "booking.updated",
	"attendee.updated",  "booking.cancelled", "invoice.issued",  "invoice.cancelled",
	"payment.recorded",  "transaction.recorded", "mail.requested",
};
/* clang-format on */

static void test_table_sorted(void **state)
{
	size_t n;
	const struct rd_handler *t = rd_handler_table(&n);
	(void)state;

	assert_int_equal(n, sizeof(spec_types) / sizeof(spec_types[0]));
	assert_int_equal(n, NMIN);
	for (size_t i = 1; i < n; i++)
		if (strcmp(t[i - 1].type, t[i].type) >= 0)
			fail_msg("table not sorted at %s, %s", t[i - 1].type, t[i].type);
	for (size_t i = 0; i < n; i++) {
		assert_string_equal(minimal[i].type, t[i].type);
		for (size_t k = 0; k < t[i].nfields; k++) {
			const struct rd_field *f = &t[i].fields[k];
			if (f->kind == RD_F_ENUM)
				assert_non_null(f->enum_values);
			if (f->flags & RD_FF_LOCK)
				assert_non_null(f->lock_prefix);
			if (f->kind != RD_F_PERSONKEYS)
				assert_non_null(f->key);
		}
	}
}

static void test_find(void **state)
{
	static const char *const mail[] = {"booking.created", "booking.cancelled", "invoice.issued",
					   "payment.recorded", "mail.requested"};
	(void)state;

	for (size_t i = 0; i < sizeof(spec_types) / sizeof(spec_types[0]); i++) {
		const struct rd_handler *h = rd_handler_find(spec_types[i]);
		assert_non_null(h);
		assert_string_equal(h->type, spec_types[i]);
	}
	assert_null(rd_handler_find("booking.deleted"));
	assert_null(rd_handler_find(""));
	assert_null(rd_handler_find("Booking.Created"));
	assert_null(rd_handler_find(NULL));
	for (size_t i = 0; i < sizeof(mail) / sizeof(mail[0]); i++)
		assert_true(rd_handler_find(mail[i])->flags & RD_H_MAIL);
	assert_false(rd_handler_find("contact.noted")->flags & RD_H_MAIL);
}

static void test_data_not_a_map(void **state)
{
	const struct rd_handler *h = rd_handler_find("contact.upserted");
	msgpack_object o = {.type = MSGPACK_OBJECT_ARRAY};
	struct rd_err err;
	json_t *out = (json_t *)1;
	(void)state;

	assert_int_equal(rd_payload_build(h, &o, &out, &err), RD_REJECT);
	assert_null(out);
	assert_string_equal(err.msg, "data: want map, got array");
	assert_int_equal(rd_payload_build(h, NULL, &out, &err), RD_REJECT);
}

/* ---- SPEC 4.1 step 1 ---- */

static void test_email(void **state)
{
	static char long255[256], long254[256];
	/* clang-format off */
	static const struct {
		const char *in;
		const char *out; /* NULL: as in */
		const char *why; /* NULL: plausible */
	} t[] = {
		{" Anna@Example.ORG ", "anna@example.org", NULL},
		{"\t a@b.c \r\n", "a@b.c", NULL},
		{"ÄNNA@Example.org", "Änna@example.org", NULL},
		{"first.last+tag@sub.example.co.uk", NULL, NULL},
		{long254, NULL, NULL},
		{"a@@b", NULL, "more than one @"},
		{"a@b@c", NULL, "more than one @"},
		{"no-at", NULL, "no @"},
		{"a b@c.d", NULL, "contains space or control character"},
		{"a\tb@c.d", NULL, "contains space or control character"},
		{"a\x01" "b@c.d", NULL, "contains space or control character"},
		{"ab@c.d\x7f", NULL, "contains space or control character"},
		{"@x", NULL, "empty local part"},
		{"x@", NULL, "empty domain part"},
		{"", NULL, "empty"},
		{"   ", "", "empty"},
		{long255, NULL, "too long"},
	};
	/* clang-format on */
	char out[300];
	(void)state;

	/* 254 and 255 bytes: "aaaa...@b.c" */
	memset(long254, 'a', 254);
	memcpy(long254 + 250, "@b.c", 4);
	memset(long255, 'a', 255);
	memcpy(long255 + 251, "@b.c", 4);

	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		const char *why = rd_email_normalise(t[i].in, strlen(t[i].in), out, sizeof(out));
		if (t[i].why == NULL && why != NULL)
			fail_msg("\"%s\": %s", t[i].in, why);
		if (t[i].why != NULL && (why == NULL || strcmp(why, t[i].why) != 0))
			fail_msg("\"%s\": got %s, want %s", t[i].in, why ? why : "plausible",
				 t[i].why);
		if (t[i].out)
			assert_string_equal(out, t[i].out);
		else if (!t[i].why)
			assert_string_equal(out, t[i].in);
	}
	/* a too small buffer is "too long", never an overflow */
	assert_string_equal(rd_email_normalise("a@b.c", 5, out, 3), "too long");
	assert_string_equal(out, "a@");
	assert_string_equal(rd_email_normalise("a@b.c", 5, out, 0), "too long");
}

static void test_email_in_payload(void **state)
{
	struct result r;
	(void)state;

	run("booking.created", "{" BOOK ",'booker':{'email':' A@@B '}}", &r);
	assert_int_equal(r.st, RD_OK);
	json_t *b = json_object_get(r.payload, "booker");
	assert_null(json_object_get(b, "email"));
	assert_string_equal(json_string_value(json_object_get(b, "email_invalid")),
			    "more than one @");
	assert_string_equal(json_string_value(json_object_get(b, "email_given")), "A@@B");
	/* no email lock for an invalid email */
	assert_int_equal(json_array_size(r.locks), 1);
	result_free(&r);
}

int main(void)
{
	static struct CMUnitTest tests[NCASES + NMIN + 5];
	static char names[NMIN][64];
	size_t n = 0;

	for (size_t i = 0; i < NCASES; i++) {
		tests[n].name = cases[i].name;
		tests[n].test_func = run_case;
		tests[n++].initial_state = (void *)&cases[i];
	}
	for (size_t i = 0; i < NMIN; i++) {
		snprintf(names[i], sizeof(names[i]), "required keys: %s", minimal[i].type);
		tests[n].name = names[i];
		tests[n].test_func = check_required;
		tests[n++].initial_state = (void *)(uintptr_t)i;
	}
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_table_sorted);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_find);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_data_not_a_map);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_email);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_email_in_payload);
	return cmocka_run_group_tests_name("handlers", tests, NULL, NULL);
}
