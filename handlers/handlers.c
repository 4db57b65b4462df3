/* handlers.c: the table of message types (SPEC 3). One row per type, sorted
 * by type for bsearch; each row lists the fields of `data` (required ones
 * flagged), their kinds and limits, the serialisation keys, and an optional
 * cross-field check. The generic validator in payload.c walks these rows. */
#include "handlers.h"

#include <stdlib.h>
#include <string.h>

#include "../daemon/template.h"

#define H_ID_MAX 128	 /* upstream ids: bookings, offers, invoices ... */
#define H_TEXT_MAX 10000 /* notes, transaction texts */
#define TITLE_MAX 1000	 /* names, titles, subjects, labels */
#define BODY_MAX 100000	 /* template bodies */
#define LANG_MAX 35	 /* BCP 47 tags, e.g. "fr-CH" */
#define TAG_MAX 200	 /* one tag */
#define VAR_MAX 10000	 /* one mail variable */

#define NF(a) (sizeof(a) / sizeof((a)[0]))

/* clang-format off: the tables read best as written */

/* Field rows. */
#define STR(k, fl, max)                                                                            \
	{                                                                                          \
		k, RD_F_STR, fl, max, NULL, NULL                                                   \
	}
#define ID(k, fl)                                                                                  \
	{                                                                                          \
		k, RD_F_STR, fl, H_ID_MAX, NULL, NULL                                              \
	}
#define LOCK(k, fl, prefix)                                                                        \
	{                                                                                          \
		k, RD_F_STR, (fl) | RD_FF_LOCK, H_ID_MAX, NULL, prefix                             \
	}
/* contact ids are rosterd's own UUIDs (SPEC 3) */
#define CONTACT(k, fl)                                                                             \
	{                                                                                          \
		k, RD_F_STR, (fl) | RD_FF_LOCK | RD_FF_UUID, H_ID_MAX, NULL, "contact"             \
	}
#define INT(k, fl)                                                                                 \
	{                                                                                          \
		k, RD_F_INT, fl, 0, NULL, NULL                                                     \
	}
#define KIND(k, kind, fl)                                                                          \
	{                                                                                          \
		k, kind, fl, 0, NULL, NULL                                                         \
	}
#define ENUM(k, fl, values)                                                                        \
	{                                                                                          \
		k, RD_F_ENUM, fl, 0, values, NULL                                                  \
	}

#define REQ RD_FF_REQUIRED

static const char *const status_values[] = {"confirmed", "pending", "waitlist", "cancelled", NULL};
static const char *const email_change_values[] = {"reassign", "retain", NULL};
static const char *const kind_values[] = {"text", "number", "date", "bool", "file", NULL};
static const char *const match_values[] = {"email", NULL};

static const struct rd_field org_configured[] = {
    STR("name", REQ, TITLE_MAX),
    KIND("sync_contacts", RD_F_BOOL, 0),
    STR("language", RD_FF_LINE, LANG_MAX),
    STR("mail_from", RD_FF_LINE, TITLE_MAX),
    STR("reply_to", RD_FF_LINE, TITLE_MAX),
};

static const struct rd_field offer_upserted[] = {
    ID("offer_id", REQ),
    STR("title", REQ, TITLE_MAX),
    KIND("starts_at", RD_F_INSTANT, 0),
    KIND("currency", RD_F_CURRENCY, 0),
    ENUM("email_change", 0, email_change_values),
};

static const struct rd_field template_upserted[] = {
    STR("key", REQ | RD_FF_LINE, RD_FIELD_KEY_MAX),
    STR("language", REQ | RD_FF_LINE, LANG_MAX),
    STR("subject", REQ | RD_FF_LINE, TITLE_MAX),
    STR("body", REQ, BODY_MAX),
};

static const struct rd_field field_defined[] = {
    STR("key", REQ | RD_FF_LINE, RD_FIELD_KEY_MAX),
    ENUM("kind", REQ, kind_values),
    STR("label", 0, TITLE_MAX),
};

static const struct rd_field contact_upserted[] = {
    {NULL, RD_F_PERSONKEYS, 0, RD_PERSON_STR_MAX, NULL, NULL},
    CONTACT("contact_id", 0),
    ENUM("match", 0, match_values),
};

static const struct rd_field contact_tagged[] = {
    CONTACT("contact_id", REQ),
    {"add", RD_F_STRLIST, 0, TAG_MAX, NULL, NULL},
    {"remove", RD_F_STRLIST, 0, TAG_MAX, NULL, NULL},
};

static const struct rd_field contact_noted[] = {
    CONTACT("contact_id", REQ),
    STR("text", REQ, H_TEXT_MAX),
    STR("author", 0, TITLE_MAX),
};

static const struct rd_field contact_merged[] = {
    CONTACT("keep", REQ),
    CONTACT("drop", REQ),
};

static const struct rd_field contact_only[] = {
    CONTACT("contact_id", REQ),
};

static const struct rd_field booking[] = {
    LOCK("booking_id", REQ, "booking"),
    INT("version", REQ | RD_FF_POSITIVE),
    ID("offer_id", REQ),
    ID("number", 0),
    ENUM("status", 0, status_values),
    KIND("booker", RD_F_PERSON, REQ),
    KIND("attendees", RD_F_ATTENDEES, 0),
    INT("total", RD_FF_NONNEG),
    KIND("currency", RD_F_CURRENCY, 0),
    KIND("notify", RD_F_BOOL, 0),
    KIND("sync", RD_F_BOOL, 0),
};

static const struct rd_field attendee_updated[] = {
    LOCK("booking_id", REQ, "booking"),
    INT("version", REQ | RD_FF_POSITIVE),
    KIND("attendee", RD_F_ATTENDEE, REQ),
    KIND("sync", RD_F_BOOL, 0),
};

static const struct rd_field booking_cancelled[] = {
    LOCK("booking_id", REQ, "booking"),
    INT("version", REQ | RD_FF_POSITIVE),
    STR("reason", 0, TITLE_MAX),
    KIND("notify", RD_F_BOOL, 0),
};

static const struct rd_field invoice_issued[] = {
    LOCK("invoice_id", REQ, "invoice"),
    INT("amount", REQ | RD_FF_POSITIVE),
    KIND("currency", RD_F_CURRENCY, REQ),
    LOCK("booking_id", 0, "booking"),
    CONTACT("contact_id", 0),
    ID("number", 0),
    INT("vat_bp", RD_FF_NONNEG),
    KIND("due", RD_F_DATE, 0),
    KIND("notify", RD_F_BOOL, 0),
};

static const struct rd_field invoice_cancelled[] = {
    LOCK("invoice_id", REQ, "invoice"),
};

static const struct rd_field payment_recorded[] = {
    ID("payment_id", REQ),
    LOCK("invoice_id", REQ, "invoice"),
    INT("amount", REQ | RD_FF_POSITIVE),
    KIND("currency", RD_F_CURRENCY, REQ),
    STR("method", 0, H_ID_MAX),
    KIND("notify", RD_F_BOOL, 0),
};

static const struct rd_field transaction_recorded[] = {
    ID("transaction_id", REQ),
    CONTACT("contact_id", REQ),
    INT("amount", REQ), /* signed: a manual credit or debit */
    KIND("currency", RD_F_CURRENCY, REQ),
    STR("text", REQ, H_TEXT_MAX),
    KIND("date", RD_F_DATE, 0),
    INT("vat_bp", RD_FF_NONNEG),
};

static const struct rd_field mail_requested[] = {
    CONTACT("contact_id", REQ),
    STR("template", REQ | RD_FF_LINE, RD_FIELD_KEY_MAX),
    {"vars", RD_F_STRMAP, 0, VAR_MAX, NULL, NULL},
};

/* SPEC 3: "booking_id or contact_id (one is required)" */
static enum rd_status check_invoice_issued(const json_t *p, struct rd_err *err)
{
	if (!json_object_get(p, "booking_id") && !json_object_get(p, "contact_id"))
		return rd_errf(err, RD_REJECT, "data: booking_id or contact_id is required");
	return RD_OK;
}

static enum rd_status check_contact_merged(const json_t *p, struct rd_err *err)
{
	if (json_equal(json_object_get(p, "keep"), json_object_get(p, "drop")))
		return rd_errf(err, RD_REJECT, "data: keep and drop are the same contact");
	return RD_OK;
}

/* SPEC 4.8: a template with an unknown placeholder is rejected, naming it
 * (the grammar is daemon/template.c; SQL checks the same). Step 4. */
static enum rd_status check_template_upserted(const json_t *p, struct rd_err *err)
{
	static const char *const keys[] = {"subject", "body"};
	for (size_t i = 0; i < 2; i++) {
		const json_t *v = json_object_get(p, keys[i]);
		char bad[120];
		if (!json_is_string(v))
			continue;
		switch (rd_tpl_check(json_string_value(v), json_string_length(v), bad, sizeof(bad))) {
		case RD_TPL_OK:
			break;
		case RD_TPL_UNKNOWN:
			return rd_errf(err, RD_REJECT, "data.%s: unknown placeholder %s", keys[i], bad);
		case RD_TPL_UNTERMINATED:
			return rd_errf(err, RD_REJECT, "data.%s: unterminated placeholder \"%s\"",
				       keys[i], bad);
		}
	}
	return RD_OK;
}

#define ROW(type, fields, flags, check)                                                            \
	{                                                                                          \
		type, fields, NF(fields), flags, check                                             \
	}

/* sorted by type (strcmp): rd_handler_find uses bsearch, a test checks it */
static const struct rd_handler handlers[] = {
    ROW("attendee.updated", attendee_updated, 0, NULL),
    ROW("booking.cancelled", booking_cancelled, RD_H_MAIL, NULL),
    ROW("booking.created", booking, RD_H_MAIL, NULL),
    ROW("booking.updated", booking, 0, NULL),
    ROW("contact.deleted", contact_only, 0, NULL),
    ROW("contact.erased", contact_only, 0, NULL),
    ROW("contact.merged", contact_merged, 0, check_contact_merged),
    ROW("contact.noted", contact_noted, 0, NULL),
    ROW("contact.tagged", contact_tagged, 0, NULL),
    ROW("contact.upserted", contact_upserted, 0, NULL),
    ROW("field.defined", field_defined, 0, NULL),
    ROW("invoice.cancelled", invoice_cancelled, 0, NULL),
    ROW("invoice.issued", invoice_issued, RD_H_MAIL, check_invoice_issued),
    ROW("mail.requested", mail_requested, RD_H_MAIL, NULL),
    ROW("offer.upserted", offer_upserted, 0, NULL),
    ROW("org.configured", org_configured, 0, NULL),
    ROW("payment.recorded", payment_recorded, RD_H_MAIL, NULL),
    ROW("template.upserted", template_upserted, 0, check_template_upserted),
    ROW("transaction.recorded", transaction_recorded, 0, NULL),
};

/* clang-format on */

static int handler_cmp(const void *key, const void *elem)
{
	return strcmp(key, ((const struct rd_handler *)elem)->type);
}

const struct rd_handler *rd_handler_find(const char *type)
{
	if (!type)
		return NULL;
	return bsearch(type, handlers, NF(handlers), sizeof(handlers[0]), handler_cmp);
}

const struct rd_handler *rd_handler_table(size_t *n)
{
	*n = NF(handlers);
	return handlers;
}
