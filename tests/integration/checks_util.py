"""checks_util.py - helpers of the Step 7 checks (test_resilience.py,
test_resources.py, test_valgrind.py):

realistic(n, orgs=5, tag) -> (setup, events): a realistic message mix.

TcpProxy: a small TCP proxy for the outage tests: rosterd connects to the
proxy, the proxy to the real server. One thread, one selector.

  p = TcpProxy(upstream_host, upstream_port); p.port   listening port
  p.stall()      stop forwarding in both directions (sockets stay open and
                 silent: a peer that hangs without closing)
  p.resume()     forward again
  p.drop_all()   reset every proxied connection (new ones are accepted)
  p.accepted     connections accepted so far; p.open() currently open
  p.close()
"""
import selectors
import socket
import struct
import threading

from harness import make_msg


def realistic(n, orgs=5, tag="v"):
    """n events over `orgs` organisations: their set-up first (org, offer,
    template), then contacts, bookings (1 in 10 with a mail), notes and
    ~5% invalid messages. Returns (setup, events)."""
    setup = []
    for o in range(orgs):
        org = "org%d" % o
        setup.append(make_msg("org.configured", {"name": "Org %d" % o, "language": "en",
                                                 "mail_from": "Org %d <info@org%d.example>" % (o, o)},
                              org=org))
        setup.append(make_msg("offer.upserted", {"offer_id": "O1", "title": "Yoga am See",
                                                 "starts_at": 1767261600000, "currency": "CHF"},
                              org=org))
        setup.append(make_msg("template.upserted", {
            "key": "booking_confirmation", "language": "en",
            "subject": "Booking {{booking.number}} for {{contact.first_name}}",
            "body": "Hello {{contact.first_name}},\nsee you at {{offer.title}} "
                    "({{offer.starts_at}}), total {{booking.total}}.\n"}, org=org))
    events = []
    n -= len(setup)
    for i in range(n):
        org = "org%d" % (i % orgs)
        email = "p%d.%s@example.org" % (i % 997, tag)
        k = i % 20
        if k < 9:
            events.append(make_msg("contact.upserted", {
                "email": email, "first_name": "Zoë %d" % i, "last_name": "Müller",
                "phone": "+41 79 %07d" % i, "city": "Bern", "fields": {"size": i % 50}},
                org=org))
        elif k < 16:
            events.append(make_msg("booking.created", {
                "booking_id": "B%s%d" % (tag, i), "version": 1, "offer_id": "O1",
                "number": "N-%d" % i, "total": 1000 + i, "currency": "CHF",
                "notify": k == 10,
                "booker": {"email": email, "first_name": "Anna", "last_name": "Muster"}},
                org=org))
        elif k < 19:
            events.append(make_msg("contact.upserted", {
                "email": email, "company": "Acme AG", "fields": {"diet": "vegan", "n": i}},
                org=org))
        else:
            events.append(make_msg("contact.upserted", {"email": 5, "first_name": "bad"},
                                   org=org))  # rejected: wrong type
    return setup, events


class TcpProxy:
    def __init__(self, host, port):
        self.upstream = (host, port)
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.pairs = {}          # socket -> its peer socket
        self.pending = {}        # socket -> bytes not yet written to it
        self.stalled = False
        self.accepted = 0
        self._cmds = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ, "accept")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    # --- control (any thread) ---
    def _cmd(self, c):
        done = threading.Event()
        with self.lock:
            self._cmds.append((c, done))
        self._wake_w.send(b"x")
        done.wait(5)

    def stall(self):
        self._cmd("stall")

    def resume(self):
        self._cmd("resume")

    def drop_all(self):
        self._cmd("drop")

    def open(self):
        with self.lock:
            return len(self.pairs) // 2

    def close(self):
        self._stop = True
        self._cmd("drop")
        self._t.join(5)
        self.lsock.close()
        self._wake_r.close()
        self._wake_w.close()

    # --- loop ---
    def _events(self, s):
        ev = 0 if self.stalled else selectors.EVENT_READ
        if self.pending.get(s) and not self.stalled:
            ev |= selectors.EVENT_WRITE
        return ev

    def _update(self, s):
        ev = self._events(s)
        try:
            if ev:
                try:
                    self.sel.modify(s, ev, "conn")
                except KeyError:
                    self.sel.register(s, ev, "conn")
            else:
                try:
                    self.sel.unregister(s)
                except KeyError:
                    pass
        except (ValueError, OSError):
            pass

    def _kill(self, s, reset=False):
        peer = self.pairs.pop(s, None)
        for x in (s, peer):
            if x is None:
                continue
            self.pairs.pop(x, None)
            self.pending.pop(x, None)
            try:
                self.sel.unregister(x)
            except (KeyError, ValueError):
                pass
            try:
                if reset:  # RST instead of FIN
                    x.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                x.close()
            except OSError:
                pass

    def _run(self):
        while not self._stop:
            for key, ev in self.sel.select(0.5):
                if key.data == "wake":
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                    with self.lock:
                        cmds, self._cmds = self._cmds, []
                    for c, done in cmds:
                        if c == "stall":
                            self.stalled = True
                        elif c == "resume":
                            self.stalled = False
                        elif c == "drop":
                            with self.lock:
                                socks = list(self.pairs)
                            for s in socks:
                                if s in self.pairs:
                                    with self.lock:
                                        self._kill(s, reset=True)
                        with self.lock:
                            for s in list(self.pairs):
                                self._update(s)
                        done.set()
                    continue
                if key.data == "accept":
                    try:
                        c, _ = self.lsock.accept()
                    except OSError:
                        continue
                    try:
                        u = socket.create_connection(self.upstream, timeout=5)
                    except OSError:
                        c.close()
                        continue
                    c.setblocking(False)
                    u.setblocking(False)
                    with self.lock:
                        self.accepted += 1
                        self.pairs[c] = u
                        self.pairs[u] = c
                        self._update(c)
                        self._update(u)
                    continue
                s = key.fileobj
                with self.lock:
                    if s not in self.pairs:
                        continue
                    peer = self.pairs[s]
                    if ev & selectors.EVENT_WRITE and self.pending.get(s):
                        try:
                            n = s.send(self.pending[s])
                            self.pending[s] = self.pending[s][n:]
                        except BlockingIOError:
                            pass
                        except OSError:
                            self._kill(s)
                            continue
                        self._update(s)
                    if ev & selectors.EVENT_READ:
                        try:
                            data = s.recv(65536)
                        except BlockingIOError:
                            continue
                        except OSError:
                            data = b""
                        if not data:
                            self._kill(s)
                            continue
                        self.pending[peer] = self.pending.get(peer, b"") + data
                        self._update(peer)
        with self.lock:
            for s in list(self.pairs):
                if s in self.pairs:
                    self._kill(s, reset=True)
