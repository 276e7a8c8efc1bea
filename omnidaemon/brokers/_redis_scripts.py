"""Lua scripts of the Redis Streams broker: each one is a single atomic step on the server.

Every script touches only keys of one topic (they share the `{topic}` hash tag), so each runs on
one Redis Cluster slot. Times come from the server's clock (`TIME`), so workers and publishers
on machines whose clocks disagree still agree on when a retry or a delayed event is due.
"""

from __future__ import annotations

__all__ = [
    "APPEND_MANY",
    "DEAD_LETTER",
    "DELAY",
    "EXTEND",
    "FETCH_RETRIES",
    "PRUNE_CONSUMERS",
    "RECLAIM",
    "REMOVE_CONSUMER",
    "RETRY",
]

_NOW_MS = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

RETRY = (
    """
-- Settle a delivery and schedule it again for this group only.
-- KEYS: source stream (topic stream or the group's retry stream), the group's due-time zset
-- ARGV: group, entry id, delay ms, zset member, delete-from-source flag
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
    return 0  -- settled already (another worker took it over and finished first)
end
if ARGV[5] == '1' then
    redis.call('XDEL', KEYS[1], ARGV[2])
end
"""
    + _NOW_MS
    + """
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[3]), ARGV[4])
return 1
"""
)

DEAD_LETTER = """
-- Settle a delivery and append its record to the group's dead-letter stream.
-- KEYS: source stream, dead-letter stream
-- ARGV: group, entry id, record, delete-from-source flag
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
    return 0
end
if ARGV[4] == '1' then
    redis.call('XDEL', KEYS[1], ARGV[2])
end
redis.call('XADD', KEYS[2], '*', 'r', ARGV[3])
return 1
"""

FETCH_RETRIES = (
    """
-- Move due retries into the group's retry stream, then read from it without blocking; also
-- release the topic's delayed events that fell due into the topic stream.
-- A retry member is '<attempt>\\n<unique>\\n<entry bytes>'; a delayed one '<unique>\\n<entry>'.
-- KEYS: the group's due-time zset, the group's retry stream, the topic's delayed zset,
--       the topic stream
-- ARGV: group, consumer, count, topic maxlen
"""
    + _NOW_MS
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, 256)
for _, member in ipairs(due) do
    local a_end = string.find(member, '\\n', 1, true)
    local u_end = string.find(member, '\\n', a_end + 1, true)
    redis.call('XADD', KEYS[2], '*', 'e', string.sub(member, u_end + 1),
               'a', string.sub(member, 1, a_end - 1))
    redis.call('ZREM', KEYS[1], member)
end
local delayed = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_ms, 'LIMIT', 0, 256)
for _, member in ipairs(delayed) do
    local u_end = string.find(member, '\\n', 1, true)
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'e', string.sub(member, u_end + 1))
    redis.call('ZREM', KEYS[3], member)
end
local entries = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                           'STREAMS', KEYS[2], '>')
local wait_ms = -1
for _, key in ipairs({KEYS[1], KEYS[3]}) do
    local next_due = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if next_due[2] then
        local w = math.max(0, tonumber(next_due[2]) - now_ms)
        if wait_ms < 0 or w < wait_ms then wait_ms = w end
    end
end
if entries then
    return {entries[1][2], wait_ms}
end
return {{}, wait_ms}
"""
)

RECLAIM = """
-- Take over deliveries idle longer than min_idle (their consumer is presumed dead) and report
-- how often each was delivered, which is what attempts are counted from.
-- KEYS: topic stream, the group's retry stream
-- ARGV: group, consumer, min idle ms, count
local out = {}
local lost = 0
local budget = tonumber(ARGV[4])
for i, key in ipairs(KEYS) do
    if budget - #out <= 0 then break end
    local claimed = redis.call('XAUTOCLAIM', key, ARGV[1], ARGV[2], ARGV[3], '0-0',
                               'COUNT', budget - #out)
    for _, entry in ipairs(claimed[2]) do
        if entry and entry ~= false and entry[2] then
            local pending = redis.call('XPENDING', key, ARGV[1], entry[1], entry[1], 1)
            local delivered = 1
            if pending[1] then delivered = pending[1][4] end
            table.insert(out, {i, entry[1], entry[2], delivered})
        end
    end
    -- Entries trimmed from the stream while pending (Redis >= 7 lists them apart; 6.2 gives
    -- nil entries): nothing is left to deliver, so clear them from the pending list.
    if claimed[3] then
        for _, id in ipairs(claimed[3]) do
            redis.call('XACK', key, ARGV[1], id)
            lost = lost + 1
        end
    end
end
return {out, lost}
"""

EXTEND = """
-- Renew the leases of deliveries this consumer still owns (idle time back to 0). A delivery
-- another worker took over in the meantime is left to that worker.
-- KEYS: the stream the ids belong to
-- ARGV: group, consumer, id...
local renewed = 0
for i = 3, #ARGV do
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
    if pending[1] and pending[1][2] == ARGV[2] then
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
        renewed = renewed + 1
    end
end
return renewed
"""

APPEND_MANY = """
-- Append many entries to one topic's stream, in order: what a pipeline of XADDs does, in one
-- command. A pipeline costs the client a command to encode and a reply to read per entry.
-- KEYS: the topic's stream
-- ARGV: its approximate MAXLEN, then each entry's data
for i = 2, #ARGV do
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i])
end
return #ARGV - 1
"""

DELAY = (
    """
-- Hold an entry in the topic's delayed set until delay ms from now by the server's clock, the
-- clock FETCH_RETRIES releases it by: a publisher whose own clock is off cannot move it.
-- The caller makes the member once, so a retried call updates its due time, never adds a
-- second copy.
-- KEYS: the topic's delayed zset
-- ARGV: delay ms, member ('<unique>\\n<entry bytes>')
"""
    + _NOW_MS
    + """
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[1]), ARGV[2])
return 1
"""
)

REMOVE_CONSUMER = """
-- Remove a consumer from the group if it holds nothing pending in either of the group's
-- streams. XGROUP DELCONSUMER drops the entries a consumer holds, so the check and the
-- removal are one step. Returns 1 if removed (or never there), 0 if it holds entries.
-- KEYS: topic stream, the group's retry stream
-- ARGV: group, consumer
for _, key in ipairs(KEYS) do
    -- An error (no such stream or group) means it holds nothing there.
    local held = redis.pcall('XPENDING', key, ARGV[1], '-', '+', 1, ARGV[2])
    if held.err == nil and #held > 0 then
        return 0
    end
end
for _, key in ipairs(KEYS) do
    redis.pcall('XGROUP', 'DELCONSUMER', key, ARGV[1], ARGV[2])
end
return 1
"""

PRUNE_CONSUMERS = """
-- Remove the group's consumers that hold nothing pending and have been idle longer than
-- min_idle ms: those of workers that died (their deliveries were taken over). A consumer is
-- judged over both streams, as `describe` shows it: a delivery held in either keeps it in
-- both. A live one removed by mistake loses nothing; its next read creates it again. The
-- check and the removal are one step, as DELCONSUMER drops the entries a consumer holds.
-- KEYS: topic stream, the group's retry stream
-- ARGV: group, min idle ms
-- Returns the names removed.
local held, idle, order = {}, {}, {}
for _, key in ipairs(KEYS) do
    -- An error (no such stream or group) means there is no consumer to remove there.
    local consumers = redis.pcall('XINFO', 'CONSUMERS', key, ARGV[1])
    if consumers.err == nil then
        for _, consumer in ipairs(consumers) do
            local info = {}
            for i = 1, #consumer, 2 do
                info[consumer[i]] = consumer[i + 1]
            end
            local name = info['name']
            if held[name] == nil then
                table.insert(order, name)
                held[name], idle[name] = 0, info['idle']
            end
            held[name] = held[name] + info['pending']
            idle[name] = math.min(idle[name], info['idle'])
        end
    end
end
local removed = {}
local min_idle = tonumber(ARGV[2])
for _, name in ipairs(order) do
    if held[name] == 0 and idle[name] > min_idle then
        for _, key in ipairs(KEYS) do
            redis.pcall('XGROUP', 'DELCONSUMER', key, ARGV[1], name)
        end
        table.insert(removed, name)
    end
end
return removed
"""
