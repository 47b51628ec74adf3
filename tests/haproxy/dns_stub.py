#!/usr/bin/env python3
"""A tiny UDP DNS server for tests (Python 3 standard library only).

Every A query, for any name, is answered with all the configured IPv4 addresses (TTL 1, one
record each). AAAA and every other query type get NOERROR with no answers. Queries that cannot
be parsed get FORMERR when their header is readable and are dropped otherwise; opcodes other
than QUERY get NOTIMP. The server never stops on a bad packet.

    python3 tests/haproxy/dns_stub.py --port 0 --answer 127.0.0.2 --answer 127.0.0.3
    python3 tests/haproxy/dns_stub.py --port 0 --answers-file /tmp/answers   # one address a line

The first line on stdout is `PORT <n>` (the port actually bound), flushed at once.

--answers-file: the file is read again on every query; when it exists, its addresses (one a
line; blank lines and `#` comments ignored, invalid lines skipped with a warning on stderr)
replace the --answer list, so a test can change the answers at run time (write a temporary file
and rename it over this one, so a query never sees half a file). An existing empty file means
"no addresses" (NOERROR, no answers). While the file does not exist, the --answer list is used.
"""

import argparse
import ipaddress
import socket
import struct
import sys

TYPE_A = 1
CLASS_IN = 1
RCODE_NOERROR, RCODE_FORMERR, RCODE_NOTIMP = 0, 1, 4


def parse_question(msg):
    """Returns (qname_end, qtype, qclass) of the first question, or raises ValueError."""
    pos = 12
    total = 0
    while True:
        if pos >= len(msg):
            raise ValueError("name runs past the packet")
        n = msg[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0:
            # A compression pointer in a question is legal but no resolver sends one; refuse it
            # rather than follow it (no loops to guard against).
            raise ValueError("compressed or reserved label in question")
        pos += 1 + n
        total += n + 1
        if total > 255:
            raise ValueError("name longer than 255 octets")
    if pos + 4 > len(msg):
        raise ValueError("question truncated")
    qtype, qclass = struct.unpack_from("!HH", msg, pos)
    return pos + 4, qtype, qclass


def header(query_id, flags_in, rcode, qdcount, ancount):
    opcode = flags_in & 0x7800
    rd = flags_in & 0x0100
    flags = 0x8000 | opcode | 0x0400 | rd | 0x0080 | rcode  # QR, opcode, AA, RD, RA, RCODE
    return struct.pack("!HHHHHH", query_id, flags, qdcount, ancount, 0, 0)


def answer(msg, addresses):
    """The reply to one datagram, or None to stay silent."""
    if len(msg) < 12:
        return None
    query_id, flags, qdcount = struct.unpack_from("!HHH", msg, 0)
    if flags & 0x8000:  # a response, not a query: never answer those (no loops)
        return None
    if (flags >> 11) & 0xF != 0:
        return header(query_id, flags, RCODE_NOTIMP, 0, 0)
    if qdcount < 1:
        return header(query_id, flags, RCODE_FORMERR, 0, 0)
    try:
        end, qtype, qclass = parse_question(msg)
    except ValueError:
        return header(query_id, flags, RCODE_FORMERR, 0, 0)
    question = msg[12:end]
    records = []
    if qtype == TYPE_A and qclass == CLASS_IN:
        for a in addresses:
            # name = pointer to the question's name (offset 12), type A, class IN, TTL 1
            records.append(struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 1, 4) + a.packed)
    return header(query_id, flags, RCODE_NOERROR, 1, len(records)) + question + b"".join(records)


def parse_addresses(lines, origin):
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            out.append(ipaddress.IPv4Address(line))
        except ValueError:
            print(f"dns_stub: {origin}: not an IPv4 address: {line!r}", file=sys.stderr, flush=True)
    return out


def current_addresses(args, fixed):
    if args.answers_file:
        try:
            with open(args.answers_file, encoding="utf-8") as f:
                return parse_addresses(f, args.answers_file)
        except FileNotFoundError:
            pass
        except OSError as e:
            print(f"dns_stub: {args.answers_file}: {e}", file=sys.stderr, flush=True)
    return fixed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="UDP port (0: any free port)")
    p.add_argument("--answer", action="append", default=[], metavar="IPV4",
                   help="address for every A query (repeatable)")
    p.add_argument("--answers-file", metavar="FILE",
                   help="file of addresses, re-read on every query (replaces --answer when present)")
    p.add_argument("--verbose", action="store_true", help="log each query on stderr")
    args = p.parse_args()
    fixed = []
    for a in args.answer:
        try:
            fixed.append(ipaddress.IPv4Address(a))
        except ValueError:
            p.error(f"--answer {a!r} is not an IPv4 address")

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.host, args.port))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    while True:
        try:
            msg, peer = sock.recvfrom(4096)
        except InterruptedError:
            continue
        except OSError as e:  # e.g. ICMP port unreachable reported on Linux
            print(f"dns_stub: recvfrom: {e}", file=sys.stderr, flush=True)
            continue
        try:
            reply = answer(msg, current_addresses(args, fixed))
            if args.verbose:
                print(f"dns_stub: {len(msg)} bytes from {peer[0]}:{peer[1]} -> "
                      f"{'no reply' if reply is None else f'{len(reply)} bytes'}",
                      file=sys.stderr, flush=True)
            if reply is not None:
                sock.sendto(reply, peer)
        except Exception as e:  # never let one datagram stop the server
            print(f"dns_stub: {peer[0]}:{peer[1]}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
