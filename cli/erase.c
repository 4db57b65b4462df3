/* erase.c: rosterctl erase ID [--org ORG]: the GDPR erasure of a contact
 * (SPEC 4.7), as a contact.erased message applied through rd.apply in one
 * transaction, so that it is recorded (report.messages, the contact's
 * activity) exactly like one from the queue. Without --org the contact is
 * looked up in every organisation (contact ids are UUIDs). Nothing is
 * committed unless the erasure applied. */
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "util.h"

static int fail(PGconn *conn, PGresult *res, int rc)
{
	PQclear(res);
	PQfinish(conn);
	return rc;
}

int ctl_erase(struct ctl *c)
{
	const char *org = NULL, *id = NULL;
	for (int i = 0; i < c->argc; i++) {
		if (strcmp(c->argv[i], "--org") == 0) {
			if (i + 1 >= c->argc)
				return ctl_die("erase: --org needs a value");
			org = c->argv[++i];
		} else if (c->argv[i][0] == '-' || id) {
			return ctl_die("erase: unexpected argument %s", c->argv[i]);
		} else {
			id = c->argv[i];
		}
	}
	if (!id)
		return ctl_die("erase: which contact? (rosterctl erase ID [--org ORG])");

	PGconn *conn = ctl_connect(c);
	if (!conn)
		return 1;
	const char *fp[2] = {id, org};
	PGresult *res = ctl_query(conn, "erase_find", 2, fp);
	if (!res)
		return fail(conn, NULL, 1);
	if (PQntuples(res) == 0) {
		if (org)
			ctl_die("erase: no contact %s in organisation %s", id, org);
		else
			ctl_die("erase: no contact %s", id);
		return fail(conn, res, 1);
	}
	if (PQntuples(res) > 1) {
		ctl_die("erase: contact %s exists in %d organisations; give --org", id,
			PQntuples(res));
		return fail(conn, res, 1);
	}
	char corg[128], cid[64];
	rd_strlcpy(corg, PQgetvalue(res, 0, 0), sizeof(corg));
	rd_strlcpy(cid, PQgetvalue(res, 0, 1), sizeof(cid));
	PQclear(res);

	/* the message: its id says who and when; its keys are the batch's */
	int64_t now = rd_now_ms();
	char msg_id[128], at[32], keys[512];
	snprintf(msg_id, sizeof(msg_id), "rosterctl:erase:%s:%" PRId64, cid, now);
	snprintf(at, sizeof(at), "%" PRId64, now);
	snprintf(keys, sizeof(keys), "{\"%s/contact:%s\",\"%s/msg:%s\"}", corg, cid, corg, msg_id);
	json_t *data = json_pack("{s:s}", "contact_id", cid);
	char *payload = json_dumps(data, JSON_COMPACT);
	json_decref(data);

	int rc = 1;
	const char *lp[1] = {keys};
	const char *ap[5] = {corg, msg_id, "contact.erased", at, payload};
	PGresult *r1 = ctl_query(conn, "admin_begin", 0, NULL);
	PQclear(r1);
	if (!r1)
		goto out;
	r1 = ctl_query(conn, "admin_lock_keys", 1, lp);
	PQclear(r1);
	if (!r1)
		goto out;
	res = ctl_query(conn, "admin_apply", 5, ap);
	if (!res)
		goto out;
	if (strcmp(PQgetvalue(res, 0, 0), "applied") != 0) {
		ctl_die("erase: contact %s: %s (%s); nothing changed", cid, PQgetvalue(res, 0, 0),
			PQgetvalue(res, 0, 1));
		PQclear(res);
		PQclear(ctl_query(conn, "admin_rollback", 0, NULL));
		goto out;
	}
	PQclear(res);
	const char *ep[2] = {corg, cid};
	res = ctl_query(conn, "erase_result", 2, ep);
	if (!res)
		goto out;
	char n[32];
	rd_strlcpy(n, PQgetvalue(res, 0, 0), sizeof(n));
	PQclear(res);
	r1 = ctl_query(conn, "admin_commit", 0, NULL);
	PQclear(r1);
	if (!r1)
		goto out;
	if (c->json) {
		json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:I}", "org", corg, "contact_id", cid,
				      "message_id", msg_id, "outcome", "applied", "contacts_erased",
				      (json_int_t)strtoll(n, NULL, 10));
		json_dumpf(o, stdout, JSON_INDENT(2));
		fputc('\n', stdout);
		json_decref(o);
	} else {
		printf("erased contact %s of %s (%s contact rows, message %s)\n", cid, corg, n,
		       msg_id);
	}
	rc = 0;
out:
	free(payload);
	PQfinish(conn);
	return rc;
}
