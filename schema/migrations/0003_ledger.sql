-- 0003_ledger: invoices, payments and the append-only ledger (SPEC 3
-- invoice.issued, invoice.cancelled, payment.recorded,
-- transaction.recorded; 4.6; 4.9 waiting; 9; the views report.invoices,
-- report.transactions, report.balances, report.key_figures).
-- docs/ledger.md states the rules as implemented and every choice made
-- where the SPEC is silent.
--
-- The ledger is rd.transactions: one row per money movement, never changed
-- or removed (a trigger refuses UPDATE, DELETE and TRUNCATE; corrections are
-- new rows). A contact's balance in a currency is the sum of its rows.
-- rd.invoices holds each invoice's state (paid, status), rd.payments each
-- payment; the ledger check (rosterctl ledger check) recomputes the ledger
-- from these documents and compares.
--
-- Serialisation: every ledger message locks "<org>/invoice:<id>" (and
-- "<org>/booking:<id>", "<org>/contact:<uuid>" when it names them) up front
-- (rd.lock_keys), so the messages of one invoice never run concurrently.
-- The contact an invoice is for (the booker of its booking) is not known
-- up front: instead of an advisory lock, which would be taken out of the
-- batch's sorted order, it is locked FOR KEY SHARE (rd.ledger_contact),
-- which is what the foreign key takes anyway, and which only a merge
-- (rd.ledger_move_contact: FOR UPDATE) or a deletion conflicts with.
--
-- Money is bigint minor units; sums are numeric inside and bigint in the
-- views (SPEC 5).

-- ---- currencies -------------------------------------------------------------

-- The active ISO 4217 codes (list one) with their minor units (NULL: "N.A.",
-- e.g. gold). Not organisation data: no org column. XTS (testing) and XXX
-- (no currency) are left out: they are not money. Codes in their
-- transition period (ANG, CUC, SLL, ZWL) are still accepted.
CREATE TABLE rd.currencies (
	code        text    NOT NULL PRIMARY KEY CHECK (code ~ '^[A-Z]{3}$'),
	minor_unit  integer CHECK (minor_unit BETWEEN 0 AND 4)
);

INSERT INTO rd.currencies (code, minor_unit) VALUES
	('AED', 2), ('AFN', 2), ('ALL', 2), ('AMD', 2), ('ANG', 2), ('AOA', 2), ('ARS', 2),
	('AUD', 2), ('AWG', 2), ('AZN', 2), ('BAM', 2), ('BBD', 2), ('BDT', 2), ('BGN', 2),
	('BHD', 3), ('BIF', 0), ('BMD', 2), ('BND', 2), ('BOB', 2), ('BOV', 2), ('BRL', 2),
	('BSD', 2), ('BTN', 2), ('BWP', 2), ('BYN', 2), ('BZD', 2), ('CAD', 2), ('CDF', 2),
	('CHE', 2), ('CHF', 2), ('CHW', 2), ('CLF', 4), ('CLP', 0), ('CNY', 2), ('COP', 2),
	('COU', 2), ('CRC', 2), ('CUC', 2), ('CUP', 2), ('CVE', 2), ('CZK', 2), ('DJF', 0),
	('DKK', 2), ('DOP', 2), ('DZD', 2), ('EGP', 2), ('ERN', 2), ('ETB', 2), ('EUR', 2),
	('FJD', 2), ('FKP', 2), ('GBP', 2), ('GEL', 2), ('GHS', 2), ('GIP', 2), ('GMD', 2),
	('GNF', 0), ('GTQ', 2), ('GYD', 2), ('HKD', 2), ('HNL', 2), ('HTG', 2), ('HUF', 2),
	('IDR', 2), ('ILS', 2), ('INR', 2), ('IQD', 3), ('IRR', 2), ('ISK', 0), ('JMD', 2),
	('JOD', 3), ('JPY', 0), ('KES', 2), ('KGS', 2), ('KHR', 2), ('KMF', 0), ('KPW', 2),
	('KRW', 0), ('KWD', 3), ('KYD', 2), ('KZT', 2), ('LAK', 2), ('LBP', 2), ('LKR', 2),
	('LRD', 2), ('LSL', 2), ('LYD', 3), ('MAD', 2), ('MDL', 2), ('MGA', 2), ('MKD', 2),
	('MMK', 2), ('MNT', 2), ('MOP', 2), ('MRU', 2), ('MUR', 2), ('MVR', 2), ('MWK', 2),
	('MXN', 2), ('MXV', 2), ('MYR', 2), ('MZN', 2), ('NAD', 2), ('NGN', 2), ('NIO', 2),
	('NOK', 2), ('NPR', 2), ('NZD', 2), ('OMR', 3), ('PAB', 2), ('PEN', 2), ('PGK', 2),
	('PHP', 2), ('PKR', 2), ('PLN', 2), ('PYG', 0), ('QAR', 2), ('RON', 2), ('RSD', 2),
	('RUB', 2), ('RWF', 0), ('SAR', 2), ('SBD', 2), ('SCR', 2), ('SDG', 2), ('SEK', 2),
	('SGD', 2), ('SHP', 2), ('SLE', 2), ('SLL', 2), ('SOS', 2), ('SRD', 2), ('SSP', 2),
	('STN', 2), ('SVC', 2), ('SYP', 2), ('SZL', 2), ('THB', 2), ('TJS', 2), ('TMT', 2),
	('TND', 3), ('TOP', 2), ('TRY', 2), ('TTD', 2), ('TWD', 2), ('TZS', 2), ('UAH', 2),
	('UGX', 0), ('USD', 2), ('USN', 2), ('UYI', 0), ('UYU', 2), ('UYW', 4), ('UZS', 2),
	('VED', 2), ('VES', 2), ('VND', 0), ('VUV', 0), ('WST', 2), ('XAF', 0), ('XAG', NULL),
	('XAU', NULL), ('XBA', NULL), ('XBB', NULL), ('XBC', NULL), ('XBD', NULL), ('XCD', 2),
	('XCG', 2), ('XDR', NULL), ('XOF', 0), ('XPD', NULL), ('XPF', 0), ('XPT', NULL),
	('XSU', NULL), ('XUA', NULL), ('YER', 2), ('ZAR', 2), ('ZMW', 2), ('ZWG', 2), ('ZWL', 2);

-- ---- tables -----------------------------------------------------------------

-- An invoice and its state. status follows paid (open: nothing paid,
-- partial: less than the amount, paid: the amount or more) until it is
-- cancelled, which is final. What was issued never changes (trigger below).
CREATE TABLE rd.invoices (
	org                text        NOT NULL,
	invoice_id         text        NOT NULL,
	booking_id         text,
	contact_id         uuid        NOT NULL,
	number             text,
	amount             bigint      NOT NULL CHECK (amount > 0),
	paid               bigint      NOT NULL DEFAULT 0 CHECK (paid >= 0),
	currency           text        NOT NULL REFERENCES rd.currencies (code),
	vat_bp             integer     CHECK (vat_bp BETWEEN 0 AND 10000),
	due                date,
	status             text        NOT NULL DEFAULT 'open'
	                   CHECK (status IN ('open', 'partial', 'paid', 'cancelled')),
	message_id         text        NOT NULL,  -- the invoice.issued message
	issued_at          timestamptz NOT NULL,  -- its upstream time
	cancel_message_id  text,                  -- the invoice.cancelled message
	cancelled_at       timestamptz,
	created_at         timestamptz NOT NULL DEFAULT now(),
	updated_at         timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (org, invoice_id),
	FOREIGN KEY (org, booking_id) REFERENCES rd.bookings (org, booking_id),
	FOREIGN KEY (org, contact_id) REFERENCES rd.contacts (org, contact_id),
	-- the state machine: status is a function of paid unless cancelled
	CHECK (status = CASE WHEN cancel_message_id IS NOT NULL THEN 'cancelled'
			     WHEN paid = 0 THEN 'open'
			     WHEN paid < amount THEN 'partial'
			     ELSE 'paid' END)
);
CREATE INDEX invoices_contact ON rd.invoices (org, contact_id);
CREATE INDEX invoices_booking ON rd.invoices (org, booking_id);

-- A payment on an invoice, in the invoice's currency. Never changed.
CREATE TABLE rd.payments (
	org         text        NOT NULL,
	payment_id  text        NOT NULL,
	invoice_id  text        NOT NULL,
	amount      bigint      NOT NULL CHECK (amount > 0),
	currency    text        NOT NULL REFERENCES rd.currencies (code),
	method      text,
	message_id  text        NOT NULL,
	at          timestamptz NOT NULL,  -- upstream time of the message
	created_at  timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (org, payment_id),
	FOREIGN KEY (org, invoice_id) REFERENCES rd.invoices (org, invoice_id)
);
CREATE INDEX payments_invoice ON rd.payments (org, invoice_id);

-- The ledger. transaction_id: the message's transaction_id for manual
-- rows; "inv:<invoice_id>", "pay:<payment_id>", "cxl:<invoice_id>" for the
-- rows the ledger derives (so a manual id may not start with those).
-- at: the upstream time of the message that caused the row (message_id);
-- date: the booking date (a manual row's `date`, else the UTC date of at).
CREATE TABLE rd.transactions (
	org             text        NOT NULL,
	transaction_id  text        NOT NULL,
	contact_id      uuid        NOT NULL,
	kind            text        NOT NULL
	                CHECK (kind IN ('invoice', 'payment', 'cancellation', 'manual')),
	amount          bigint      NOT NULL,
	currency        text        NOT NULL REFERENCES rd.currencies (code),
	text            text,
	invoice_id      text,
	payment_id      text,
	vat_bp          integer     CHECK (vat_bp BETWEEN 0 AND 10000),
	date            date        NOT NULL,
	message_id      text        NOT NULL,
	at              timestamptz NOT NULL,
	created_at      timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (org, transaction_id),
	FOREIGN KEY (org, contact_id) REFERENCES rd.contacts (org, contact_id),
	FOREIGN KEY (org, invoice_id) REFERENCES rd.invoices (org, invoice_id),
	FOREIGN KEY (org, payment_id) REFERENCES rd.payments (org, payment_id),
	CHECK ((kind = 'manual') = (invoice_id IS NULL)),
	CHECK ((kind = 'payment') = (payment_id IS NOT NULL)),
	CHECK (CASE kind WHEN 'invoice' THEN amount < 0
			 WHEN 'payment' THEN amount > 0
			 WHEN 'cancellation' THEN amount > 0
			 ELSE true END)
);
CREATE INDEX transactions_contact ON rd.transactions (org, contact_id, currency);
CREATE INDEX transactions_invoice ON rd.transactions (org, invoice_id) WHERE invoice_id IS NOT NULL;

-- ---- append-only ------------------------------------------------------------

-- rd.transactions and rd.payments: no UPDATE, DELETE or TRUNCATE, for any
-- role (the daemon's role owns the tables, so privileges could not stop it;
-- a trigger does, unless the owner deliberately disables it with DDL, which
-- the ledger check would then expose). The one exception: the contact merge
-- moves a dropped contact's rows to the keeping contact, an UPDATE that
-- changes contact_id and nothing else, allowed only while the
-- transaction-local setting rd.ledger_move is 'on' (rd.ledger_move_contact).
CREATE FUNCTION rd.ledger_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
	IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'transactions'
	   AND coalesce(current_setting('rd.ledger_move', true), '') = 'on'
	   AND to_jsonb(NEW) - 'contact_id' = to_jsonb(OLD) - 'contact_id' THEN
		RETURN NEW;
	END IF;
	RAISE EXCEPTION USING ERRCODE = 'RDAPP',
		MESSAGE = format('rd.%s is append-only: %s refused (a correction is a new row)',
				 TG_TABLE_NAME, TG_OP);
END $$;

CREATE TRIGGER transactions_append_only BEFORE UPDATE OR DELETE ON rd.transactions
	FOR EACH ROW EXECUTE FUNCTION rd.ledger_append_only();
CREATE TRIGGER transactions_no_truncate BEFORE TRUNCATE ON rd.transactions
	FOR EACH STATEMENT EXECUTE FUNCTION rd.ledger_append_only();
CREATE TRIGGER payments_append_only BEFORE UPDATE OR DELETE ON rd.payments
	FOR EACH ROW EXECUTE FUNCTION rd.ledger_append_only();
CREATE TRIGGER payments_no_truncate BEFORE TRUNCATE ON rd.payments
	FOR EACH STATEMENT EXECUTE FUNCTION rd.ledger_append_only();

-- rd.invoices: what was issued never changes and an invoice is never
-- removed. paid only grows, status follows it (CHECK above) and a
-- cancellation is final. contact_id moves only with rd.ledger_move = 'on'.
CREATE FUNCTION rd.invoices_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
	v_changed text[];
	v_allowed text[] := ARRAY['paid', 'status', 'cancel_message_id', 'cancelled_at',
				  'updated_at'];
BEGIN
	IF TG_OP <> 'UPDATE' THEN
		RAISE EXCEPTION USING ERRCODE = 'RDAPP',
			MESSAGE = format('rd.invoices: %s refused (invoices are never removed)', TG_OP);
	END IF;
	IF coalesce(current_setting('rd.ledger_move', true), '') = 'on' THEN
		v_allowed := v_allowed || 'contact_id'::text;
	END IF;
	SELECT array_agg(n.key ORDER BY n.key) INTO v_changed
	  FROM jsonb_each(to_jsonb(NEW)) n
	  JOIN jsonb_each(to_jsonb(OLD)) o USING (key)
	 WHERE n.value IS DISTINCT FROM o.value AND NOT n.key = ANY (v_allowed);
	IF v_changed IS NOT NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'RDAPP',
			MESSAGE = format('rd.invoices: %s of an issued invoice cannot change',
					 array_to_string(v_changed, ', '));
	END IF;
	IF NEW.paid < OLD.paid OR (OLD.cancel_message_id IS NOT NULL
				   AND NEW.cancel_message_id IS DISTINCT FROM OLD.cancel_message_id) THEN
		RAISE EXCEPTION USING ERRCODE = 'RDAPP',
			MESSAGE = 'rd.invoices: paid never decreases and a cancellation is final';
	END IF;
	RETURN NEW;
END $$;

CREATE TRIGGER invoices_guard BEFORE UPDATE OR DELETE ON rd.invoices
	FOR EACH ROW EXECUTE FUNCTION rd.invoices_guard();
CREATE TRIGGER invoices_no_truncate BEFORE TRUNCATE ON rd.invoices
	FOR EACH STATEMENT EXECUTE FUNCTION rd.invoices_guard();

-- ---- helpers ----------------------------------------------------------------

-- An integer of the payload (the C validator guarantees it; checked again
-- here because the rule belongs to the schema).
CREATE FUNCTION rd.ledger_int(d jsonb, p_key text) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
	IF d->p_key IS NULL OR jsonb_typeof(d->p_key) = 'null' THEN
		RETURN NULL;
	END IF;
	IF jsonb_typeof(d->p_key) <> 'number' OR (d->>p_key) !~ '^-?[0-9]+$' THEN
		PERFORM rd.reject(format('data.%s: want an integer', p_key));
	END IF;
	RETURN (d->>p_key)::bigint;
EXCEPTION WHEN numeric_value_out_of_range THEN
	PERFORM rd.reject(format('data.%s: outside the signed 64-bit range', p_key));
	RETURN NULL;
END $$;

-- The amount of an invoice or payment: given and above 0.
CREATE FUNCTION rd.ledger_positive(d jsonb, p_what text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
	v bigint := rd.ledger_int(d, 'amount');
BEGIN
	IF v IS NULL THEN
		PERFORM rd.reject('data.amount is required');
	END IF;
	IF v <= 0 THEN
		PERFORM rd.reject(format('%s amount must be positive (got %s)', p_what, v));
	END IF;
	RETURN v;
END $$;

-- A currency code of the payload that rd.currencies knows.
CREATE FUNCTION rd.ledger_currency(d jsonb) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	v text := d->>'currency';
BEGIN
	IF v IS NULL THEN
		PERFORM rd.reject('data.currency is required');
	END IF;
	IF NOT EXISTS (SELECT 1 FROM rd.currencies c WHERE c.code = v) THEN
		PERFORM rd.reject(format('unknown currency code %s (not an active ISO 4217 code)',
					 left(v, 20)));
	END IF;
	RETURN v;
END $$;

CREATE FUNCTION rd.ledger_vat(d jsonb) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
	v bigint := rd.ledger_int(d, 'vat_bp');
BEGIN
	IF v < 0 OR v > 10000 THEN
		PERFORM rd.reject(format('vat_bp must be between 0 and 10000 (100 %%), got %s', v));
	END IF;
	RETURN v::integer;
END $$;

CREATE FUNCTION rd.ledger_date(d jsonb, p_key text) RETURNS date
LANGUAGE plpgsql AS $$
BEGIN
	IF d->>p_key IS NULL THEN
		RETURN NULL;
	END IF;
	IF (d->>p_key) !~ '^\d{4}-\d{2}-\d{2}$' THEN
		PERFORM rd.reject(format('data.%s: want a date YYYY-MM-DD', p_key));
	END IF;
	RETURN (d->>p_key)::date;
EXCEPTION WHEN datetime_field_overflow OR invalid_datetime_format THEN
	PERFORM rd.reject(format('data.%s: not a calendar date', p_key));
	RETURN NULL;
END $$;

-- 12050, 'CHF' -> 'CHF 120.50'; -500, 'JPY' -> 'JPY -500' (activity texts).
CREATE FUNCTION rd.ledger_money(p_amount bigint, p_cur text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
	v_mu integer;
BEGIN
	-- PL/pgSQL, not LANGUAGE sql: planned once per session (0002, msg_at)
	SELECT minor_unit INTO v_mu FROM rd.currencies WHERE code = p_cur;
	RETURN p_cur || ' ' || CASE WHEN coalesce(v_mu, 0) = 0 THEN p_amount::text
				    ELSE to_char(p_amount::numeric / 10::numeric ^ v_mu,
						 'FM' || repeat('9', 17) || '0.' || repeat('0', v_mu))
				    END;
END $$;

-- The live contact for a contact of this organisation, locked FOR KEY
-- SHARE: a merge running concurrently (rd.ledger_move_contact locks the
-- dropped contact FOR UPDATE first) either finishes before (then its
-- tombstone is followed to the keeping contact) or waits until this
-- transaction has committed (then it moves what was written here). NULL
-- when the contact does not exist in the organisation.
CREATE FUNCTION rd.ledger_contact(p_org text, p_cid uuid) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
	v_id uuid := p_cid;
	v_next uuid;
BEGIN
	FOR i IN 1..100 LOOP
		SELECT c.merged_into INTO v_next FROM rd.contacts c
		 WHERE c.org = p_org AND c.contact_id = v_id FOR KEY SHARE;
		IF NOT FOUND THEN
			RETURN NULL;
		END IF;
		IF v_next IS NULL THEN
			RETURN v_id;
		END IF;
		v_id := v_next;
	END LOOP;
	RETURN v_id;
END $$;

-- For the contact merge (SPEC 4.7): move the dropped contact's invoices and
-- ledger rows to the keeping contact, in the caller's transaction. Locks
-- the dropped contact first (see rd.ledger_contact), then opens the one
-- exception of the append-only triggers for these statements only. Sums
-- are unchanged (the ledger check verifies). Returns the number of ledger
-- rows moved.
CREATE FUNCTION rd.ledger_move_contact(p_org text, p_drop uuid, p_keep uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
	v_n integer;
BEGIN
	IF p_drop = p_keep THEN
		RETURN 0;
	END IF;
	PERFORM 1 FROM rd.contacts c
	 WHERE c.org = p_org AND c.contact_id IN (p_drop, p_keep)
	 ORDER BY c.contact_id FOR UPDATE;
	PERFORM set_config('rd.ledger_move', 'on', true);
	UPDATE rd.invoices SET contact_id = p_keep, updated_at = now()
	 WHERE org = p_org AND contact_id = p_drop;
	UPDATE rd.transactions SET contact_id = p_keep
	 WHERE org = p_org AND contact_id = p_drop;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	PERFORM set_config('rd.ledger_move', 'off', true);
	RETURN v_n;
END $$;

-- Manual transaction ids may not look like the ids the ledger derives.
CREATE FUNCTION rd.ledger_reserved_id(p_id text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
	SELECT left(p_id, 4) IN ('inv:', 'pay:', 'cxl:')
$$;

CREATE FUNCTION rd.ledger_invoice_label(p_iid text, p_number text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
	SELECT 'invoice ' || CASE WHEN p_number IS NULL OR p_number = p_iid THEN p_iid
				  ELSE p_number || ' (' || p_iid || ')' END
$$;

-- ---- handlers ---------------------------------------------------------------

-- invoice.issued: for the booker of booking_id, else for contact_id. The
-- booking must have been seen (else wait); a booker assigned to no contact
-- takes contact_id when given, else the invoice is rejected. An invoice_id
-- is issued once. Transaction -amount (kind invoice).
CREATE FUNCTION rd.h_invoice_issued(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_iid text := d->>'invoice_id';
	v_bid text := d->>'booking_id';
	v_amount bigint;
	v_cur text;
	v_vat integer;
	v_due date;
	v_at timestamptz := coalesce(p_at, now());
	v_prev rd.invoices%ROWTYPE;
	v_b rd.bookings%ROWTYPE;
	v_cid uuid;
	v_note text := '';
	v_label text;
BEGIN
	PERFORM rd.lock_key(p_org, 'invoice:' || v_iid);
	v_amount := rd.ledger_positive(d, 'invoice');
	v_cur := rd.ledger_currency(d);
	v_vat := rd.ledger_vat(d);
	v_due := rd.ledger_date(d, 'due');
	SELECT * INTO v_prev FROM rd.invoices i WHERE i.org = p_org AND i.invoice_id = v_iid;
	IF FOUND THEN
		PERFORM rd.reject(format('invoice %s already issued (by message %s)', v_iid,
					 v_prev.message_id));
	END IF;

	IF v_bid IS NULL AND NOT d ? 'contact_id' THEN
		PERFORM rd.reject('data: booking_id or contact_id is required');
	END IF;
	IF v_bid IS NOT NULL THEN
		PERFORM rd.lock_key(p_org, 'booking:' || v_bid);
		SELECT * INTO v_b FROM rd.bookings b WHERE b.org = p_org AND b.booking_id = v_bid;
		-- a booking made by attendee.updated alone has no booker yet
		IF NOT FOUND OR v_b.match IS NULL THEN
			PERFORM rd.wait(format('booking %s not yet seen', v_bid));
		END IF;
		IF v_b.contact_id IS NOT NULL THEN
			v_cid := rd.ledger_contact(p_org, v_b.contact_id);
			IF d ? 'contact_id'
			   AND rd.contact_resolve(p_org, d->>'contact_id') IS DISTINCT FROM v_cid THEN
				v_note := '; contact_id of the message ignored: the invoice belongs to the booker';
			END IF;
		ELSIF d ? 'contact_id' THEN
			v_cid := rd.contact_required(p_org, d->>'contact_id');
			v_note := format('; booking %s has no booker contact: contact_id used', v_bid);
		ELSE
			PERFORM rd.reject(format('booking %s: its booker has no contact (%s), so the '
						 'invoice has no one to belong to; send contact_id',
						 v_bid, v_b.match));
		END IF;
	ELSE
		v_cid := rd.contact_required(p_org, d->>'contact_id');
	END IF;
	v_cid := rd.ledger_contact(p_org, v_cid);

	INSERT INTO rd.invoices (org, invoice_id, booking_id, contact_id, number, amount, currency,
				 vat_bp, due, message_id, issued_at)
	VALUES (p_org, v_iid, v_bid, v_cid, d->>'number', v_amount, v_cur, v_vat, v_due, p_id, v_at);
	v_label := rd.ledger_invoice_label(v_iid, d->>'number');
	INSERT INTO rd.transactions (org, transaction_id, contact_id, kind, amount, currency, text,
				     invoice_id, vat_bp, date, message_id, at)
	VALUES (p_org, 'inv:' || v_iid, v_cid, 'invoice', -v_amount, v_cur, v_label, v_iid, v_vat,
		(v_at AT TIME ZONE 'UTC')::date, p_id, v_at);
	PERFORM rd.activity_add(p_org, v_cid, 'invoice',
		format('%s issued: %s%s%s%s', v_label, rd.ledger_money(v_amount, v_cur),
		       coalesce(', booking ' || v_bid, ''), coalesce(', due ' || v_due::text, ''),
		       v_note), p_id);
	RETURN 'applied';
END $$;

-- payment.recorded: the invoice must exist (else wait), be in the same
-- currency and not be cancelled. A payment_id is recorded once. Paying more
-- than is open is allowed (the balance becomes positive). Transaction
-- +amount (kind payment).
CREATE FUNCTION rd.h_payment_recorded(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_pid text := d->>'payment_id';
	v_iid text := d->>'invoice_id';
	v_amount bigint;
	v_cur text;
	v_at timestamptz := coalesce(p_at, now());
	v_inv rd.invoices%ROWTYPE;
	v_prev rd.payments%ROWTYPE;
	v_cid uuid;
	v_status text;
	v_paid bigint;
BEGIN
	PERFORM rd.lock_key(p_org, 'invoice:' || v_iid);
	v_amount := rd.ledger_positive(d, 'payment');
	v_cur := rd.ledger_currency(d);
	SELECT * INTO v_prev FROM rd.payments p WHERE p.org = p_org AND p.payment_id = v_pid;
	IF FOUND THEN
		PERFORM rd.reject(format('payment %s already recorded (on invoice %s by message %s)',
					 v_pid, v_prev.invoice_id, v_prev.message_id));
	END IF;
	SELECT * INTO v_inv FROM rd.invoices i WHERE i.org = p_org AND i.invoice_id = v_iid
	   FOR UPDATE;
	IF NOT FOUND THEN
		PERFORM rd.wait(format('invoice %s not yet seen', v_iid));
	END IF;
	IF v_inv.status = 'cancelled' THEN
		PERFORM rd.reject(format('payment on cancelled invoice %s (cancelled by message %s)',
					 v_iid, v_inv.cancel_message_id));
	END IF;
	IF v_cur <> v_inv.currency THEN
		PERFORM rd.reject(format('currency mismatch: payment %s is in %s, invoice %s in %s',
					 v_pid, v_cur, v_iid, v_inv.currency));
	END IF;
	IF v_inv.paid::numeric + v_amount > 9223372036854775807 THEN
		PERFORM rd.reject(format('payment %s: invoice %s would be paid beyond the 64-bit range',
					 v_pid, v_iid));
	END IF;
	v_cid := rd.ledger_contact(p_org, v_inv.contact_id);

	INSERT INTO rd.payments (org, payment_id, invoice_id, amount, currency, method, message_id, at)
	VALUES (p_org, v_pid, v_iid, v_amount, v_cur, d->>'method', p_id, v_at)
	ON CONFLICT DO NOTHING;
	IF NOT FOUND THEN
		-- recorded meanwhile by a concurrent transaction (another invoice's lock)
		PERFORM rd.reject(format('payment %s already recorded', v_pid));
	END IF;
	v_paid := v_inv.paid + v_amount;
	v_status := CASE WHEN v_paid < v_inv.amount THEN 'partial' ELSE 'paid' END;
	UPDATE rd.invoices SET paid = v_paid, status = v_status, updated_at = now()
	 WHERE org = p_org AND invoice_id = v_iid;
	INSERT INTO rd.transactions (org, transaction_id, contact_id, kind, amount, currency, text,
				     invoice_id, payment_id, date, message_id, at)
	VALUES (p_org, 'pay:' || v_pid, v_cid, 'payment', v_amount, v_cur,
		format('payment %s on %s', v_pid, rd.ledger_invoice_label(v_iid, v_inv.number)),
		v_iid, v_pid, (v_at AT TIME ZONE 'UTC')::date, p_id, v_at);
	PERFORM rd.activity_add(p_org, v_cid, 'payment',
		format('payment %s of %s%s on %s: %s, %s of %s paid%s', v_pid,
		       rd.ledger_money(v_amount, v_cur), coalesce(' by ' || (d->>'method'), ''),
		       rd.ledger_invoice_label(v_iid, v_inv.number), v_status,
		       rd.ledger_money(v_paid, v_cur), rd.ledger_money(v_inv.amount, v_cur),
		       CASE WHEN v_paid > v_inv.amount
			    THEN format(' (overpaid by %s)', rd.ledger_money(v_paid - v_inv.amount, v_cur))
			    ELSE '' END), p_id);
	RETURN 'applied';
END $$;

-- invoice.cancelled: waits for an invoice not yet seen; a second
-- cancellation is rejected. Credits the full amount, also when partly or
-- fully paid (SPEC 9): what was paid stays on the balance as a credit.
-- Transaction +amount (kind cancellation).
CREATE FUNCTION rd.h_invoice_cancelled(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_iid text := d->>'invoice_id';
	v_at timestamptz := coalesce(p_at, now());
	v_inv rd.invoices%ROWTYPE;
	v_cid uuid;
	v_label text;
BEGIN
	PERFORM rd.lock_key(p_org, 'invoice:' || v_iid);
	SELECT * INTO v_inv FROM rd.invoices i WHERE i.org = p_org AND i.invoice_id = v_iid
	   FOR UPDATE;
	IF NOT FOUND THEN
		PERFORM rd.wait(format('invoice %s not yet seen', v_iid));
	END IF;
	IF v_inv.status = 'cancelled' THEN
		PERFORM rd.reject(format('invoice %s already cancelled (by message %s)', v_iid,
					 v_inv.cancel_message_id));
	END IF;
	v_cid := rd.ledger_contact(p_org, v_inv.contact_id);
	v_label := rd.ledger_invoice_label(v_iid, v_inv.number);
	UPDATE rd.invoices SET status = 'cancelled', cancel_message_id = p_id, cancelled_at = v_at,
			       updated_at = now()
	 WHERE org = p_org AND invoice_id = v_iid;
	INSERT INTO rd.transactions (org, transaction_id, contact_id, kind, amount, currency, text,
				     invoice_id, vat_bp, date, message_id, at)
	VALUES (p_org, 'cxl:' || v_iid, v_cid, 'cancellation', v_inv.amount, v_inv.currency,
		'cancellation of ' || v_label, v_iid, v_inv.vat_bp, (v_at AT TIME ZONE 'UTC')::date,
		p_id, v_at);
	PERFORM rd.activity_add(p_org, v_cid, 'invoice.cancelled',
		format('%s cancelled: %s credited%s', v_label,
		       rd.ledger_money(v_inv.amount, v_inv.currency),
		       CASE WHEN v_inv.paid > 0
			    THEN format(' (%s paid on it stays as credit)',
					rd.ledger_money(v_inv.paid, v_inv.currency))
			    ELSE '' END), p_id);
	RETURN 'applied';
END $$;

-- transaction.recorded: a manual credit (amount > 0) or debit (< 0) of a
-- contact, linked to no invoice. The contact must exist (else wait); a
-- transaction_id is recorded once. The activity names the id and amount,
-- not the text (free text may hold personal data).
CREATE FUNCTION rd.h_transaction_recorded(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_tid text := d->>'transaction_id';
	v_amount bigint;
	v_cur text;
	v_vat integer;
	v_date date;
	v_at timestamptz := coalesce(p_at, now());
	v_prev rd.transactions%ROWTYPE;
	v_cid uuid;
BEGIN
	v_amount := rd.ledger_int(d, 'amount');
	IF v_amount IS NULL THEN
		PERFORM rd.reject('data.amount is required');
	END IF;
	IF d->>'text' IS NULL THEN
		PERFORM rd.reject('data.text is required');
	END IF;
	v_cur := rd.ledger_currency(d);
	v_vat := rd.ledger_vat(d);
	v_date := coalesce(rd.ledger_date(d, 'date'), (v_at AT TIME ZONE 'UTC')::date);
	IF rd.ledger_reserved_id(v_tid) THEN
		PERFORM rd.reject(format('transaction_id %s: the prefixes inv:, pay: and cxl: are '
					 'reserved for the ledger''s own rows', v_tid));
	END IF;
	SELECT * INTO v_prev FROM rd.transactions t
	 WHERE t.org = p_org AND t.transaction_id = v_tid;
	IF FOUND THEN
		PERFORM rd.reject(format('transaction %s already recorded (by message %s)', v_tid,
					 v_prev.message_id));
	END IF;
	v_cid := rd.ledger_contact(p_org, rd.contact_required(p_org, d->>'contact_id'));

	INSERT INTO rd.transactions (org, transaction_id, contact_id, kind, amount, currency, text,
				     vat_bp, date, message_id, at)
	VALUES (p_org, v_tid, v_cid, 'manual', v_amount, v_cur, d->>'text', v_vat, v_date, p_id,
		v_at)
	ON CONFLICT DO NOTHING;
	IF NOT FOUND THEN
		PERFORM rd.reject(format('transaction %s already recorded', v_tid));
	END IF;
	PERFORM rd.activity_add(p_org, v_cid, 'transaction',
		format('manual transaction %s: %s on %s%s', v_tid, rd.ledger_money(v_amount, v_cur),
		       v_date, coalesce(', VAT ' || v_vat || ' bp', '')), p_id);
	RETURN 'applied';
END $$;

INSERT INTO rd.handler_fns (type, fn) VALUES
	('invoice.issued', 'rd.h_invoice_issued'),
	('invoice.cancelled', 'rd.h_invoice_cancelled'),
	('payment.recorded', 'rd.h_payment_recorded'),
	('transaction.recorded', 'rd.h_transaction_recorded')
ON CONFLICT (type) DO UPDATE SET fn = EXCLUDED.fn;
SELECT rd.rebuild_dispatch();

-- ---- reporting views ----------------------------------------------------------

-- open = max(0, amount - paid) (SPEC 9), also for a cancelled invoice:
-- status says that nothing is owed on it; key figures leave it out.
CREATE VIEW report.invoices AS
	SELECT org, invoice_id, booking_id, contact_id::text AS contact_id, number, amount, paid,
	       greatest(0, amount - paid) AS open, currency, vat_bp, status, due
	  FROM rd.invoices;

CREATE VIEW report.transactions AS
	SELECT org, transaction_id, contact_id::text AS contact_id, kind, amount, currency, text,
	       invoice_id, message_id, at
	  FROM rd.transactions;

CREATE VIEW report.balances AS
	SELECT org, contact_id::text AS contact_id, currency, sum(amount)::bigint AS balance
	  FROM rd.transactions
	 GROUP BY org, contact_id, currency;

-- One row per contact and currency of the ledger (the same keys as
-- report.balances): revenue and number of the invoices not cancelled, and
-- what is still open on them (an overpaid invoice counts 0, never less).
CREATE VIEW report.key_figures AS
	SELECT k.org, k.contact_id::text AS contact_id, k.currency,
	       coalesce(i.revenue, 0)::bigint AS revenue, coalesce(i.invoices, 0)::bigint AS invoices,
	       coalesce(i.outstanding, 0)::bigint AS outstanding
	  FROM (SELECT DISTINCT org, contact_id, currency FROM rd.transactions) k
	  LEFT JOIN (SELECT org, contact_id, currency, sum(amount) AS revenue, count(*) AS invoices,
			    sum(greatest(0, amount - paid)) AS outstanding
		       FROM rd.invoices
		      WHERE status <> 'cancelled'
		      GROUP BY org, contact_id, currency) i
		 ON i.org = k.org AND i.contact_id = k.contact_id AND i.currency = k.currency;
