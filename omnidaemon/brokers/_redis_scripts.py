"""Lua scripts of the Redis Streams broker: each one is a single atomic step on the server.

Every script touches only keys of one topic (they share the `{topic}` hash tag), so each runs on
one Redis Cluster slot. Times come from the server's clock (`TIME`), so workers and publishers
on machines whose clocks disagree still agree on when a retry or a delayed event is due.
"""

from __future__ import annotations

__all__ = [
    "APPEND_IF_EXISTS",
    "APPEND_MANY",
    "APPEND_ONCE",
    "DEAD_LETTER",
    "DELAY",
    "EXTEND",
    "FETCH_RETRIES",
    "PRUNE_CONSUMERS",
    "PURGE_BACKLOG",
    "RECLAIM",
    "RECOVER",
    "REMOVE_CONSUMER",
    "REPLACE_VALUE",
    "REPLAY",
    "RETRY",
]

_NOW_MS = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_OWNED = """
-- Whether `consumer` holds entry `id` of `group` (any consumer, when it is empty). XACK alone
-- would settle a delivery another consumer took over and is still running.
local function owned(key, group, id, consumer)
    local p = redis.call('XPENDING', key, group, id, id, 1)
    return p[1] ~= nil and (consumer == '' or p[1][2] == consumer)
end
"""

RETRY = (
    _OWNED
    + """
-- Settle a delivery and schedule it again for this group only.
-- KEYS: source stream (topic stream or the group's retry stream), the group's due-time zset
-- ARGV: group, entry id, delay ms, zset member, delete-from-source flag, trimmed flag, consumer
-- Returns 1 when settled here, 0 when the consumer no longer held the delivery: another worker
-- took it over (and settled it or will), so this worker must report nothing. With the trimmed
-- flag the entry is gone from the stream (it was trimmed while its handler ran, and lease
-- renewal cleared it from the pending list): the worker's copy is the only one, so it is
-- scheduled regardless.
if ARGV[6] ~= '1' and not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[7]) then
    return 0
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
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

DEAD_LETTER = (
    _OWNED
    + """
-- Settle a delivery and append its record to the group's dead-letter stream.
-- KEYS: source stream, dead-letter stream
-- ARGV: group, entry id, record, delete-from-source flag, trimmed flag, consumer (as in RETRY)
if ARGV[5] ~= '1' and not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[6]) then
    return 0
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if ARGV[4] == '1' then
    redis.call('XDEL', KEYS[1], ARGV[2])
end
redis.call('XADD', KEYS[2], '*', 'r', ARGV[3])
return 1
"""
)

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

_FIRST_ATTEMPT = """
-- The attempt an entry's first delivery from KEYS[which] is: 1 from the topic stream (which 1),
-- the `a` field from the group's retry stream (which 2).
local function first_attempt(which, fields)
    if which == 1 then return 1 end
    for f = 1, #fields, 2 do
        if fields[f] == 'a' then return tonumber(fields[f + 1]) end
    end
    return 2
end
"""

RECLAIM = (
    _FIRST_ATTEMPT
    + """
-- Take over deliveries idle longer than min_idle (their consumer is presumed dead), each as a new
-- attempt, and report the attempt each is taken over as.
-- XPENDING's IDLE filter finds idle entries wherever they are in the pending list, so live
-- workers' long-running deliveries ahead of them never hide them (XAUTOCLAIM from 0-0 would
-- examine only COUNT x 10 entries a call). Pages are followed to the end of the list.
-- KEYS: topic stream, the group's retry stream
-- ARGV: group, consumer, min idle ms, count, hold-back attempt (0: none)
-- A delivery that would be taken over as exactly the hold-back attempt is left where it is and
-- counted: a busy worker does not take over a delivery that must run alone (its last attempt).
local out = {}
local lost = 0
local held = 0
local want = tonumber(ARGV[4])
local hold = tonumber(ARGV[5])
for i, key in ipairs(KEYS) do
    local start = '-'
    while #out < want do
        local page = redis.call('XPENDING', key, ARGV[1], 'IDLE', ARGV[3], start, '+', 100)
        for _, p in ipairs(page) do
            if #out >= want then break end
            local id, delivered = p[1], tonumber(p[4])
            local entry = redis.call('XRANGE', key, id, id)
            if #entry == 0 then
                -- Trimmed from the stream while pending, by a consumer that no longer renews
                -- it: nothing is left to deliver, so clear it from the pending list.
                redis.call('XACK', key, ARGV[1], id)
                lost = lost + 1
            else
                local fields = entry[1][2]
                local attempt = first_attempt(i, fields) + delivered  -- one more delivery
                if hold > 0 and attempt == hold then
                    held = held + 1
                elseif #redis.call('XCLAIM', key, ARGV[1], ARGV[2], ARGV[3], id) > 0 then
                    table.insert(out, {i, id, fields, attempt})
                end
            end
        end
        if #page < 100 then break end
        start = '(' .. page[#page][1]
    end
end
return {out, lost, held}
"""
)

RECOVER = (
    _FIRST_ATTEMPT
    + """
-- A consumer's own pending deliveries, as they were delivered: same attempt, nothing counted.
-- Used to take back what a fetch delivered when its reply never reached the worker (a cancelled
-- fetch, a connection lost mid-reply), so that such entries are not charged an attempt.
-- KEYS: topic stream, the group's retry stream
-- ARGV: group, consumer, count
local out = {}
for i, key in ipairs(KEYS) do
    local page = redis.call('XPENDING', key, ARGV[1], '-', '+', tonumber(ARGV[3]), ARGV[2])
    for _, p in ipairs(page) do
        local entry = redis.call('XRANGE', key, p[1], p[1])
        if #entry > 0 then
            local fields = entry[1][2]
            table.insert(out, {i, p[1], fields, first_attempt(i, fields) + tonumber(p[4]) - 1})
        end
    end
end
return out
"""
)

EXTEND = """
-- Renew the leases of deliveries this consumer still owns (idle time back to 0), and report the
-- ones it lost: {lost ids, trimmed ids}.
-- Lost: another worker took the delivery over (or it was settled); the caller must record and
-- publish nothing for it. Trimmed: the entry left the stream while pending; XCLAIM would drop
-- it from the pending list unseen (Redis >= 7), so it is acknowledged here instead and reported:
-- the worker holds the only copy and settles its outcome from it.
-- KEYS: the stream the ids belong to
-- ARGV: group, consumer, id...
local lost, trimmed = {}, {}
for i = 3, #ARGV do
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
    if pending[1] and pending[1][2] == ARGV[2] then
        if #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) == 0 then
            redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
            table.insert(trimmed, ARGV[i])
        else
            redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
        end
    else
        table.insert(lost, ARGV[i])
    end
end
return {lost, trimmed}
"""

REPLACE_VALUE = """
-- Compare and set: store ARGV[2] for ARGV[3] ms only if the key holds ARGV[1] (an empty ARGV[2]
-- deletes it instead). Returns 1 when done.
-- KEYS: the value's key
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
if ARGV[2] == '' then
    redis.call('DEL', KEYS[1])
else
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
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

APPEND_IF_EXISTS = """
-- Append an entry to a topic's stream only while the stream exists: a reply to a request that
-- is over (its reply topic deleted or expired) is dropped instead of recreating the topic,
-- which nobody would delete. An XADD to a stream that has a TTL keeps it.
-- KEYS: the topic's stream
-- ARGV: its approximate MAXLEN, the entry's data
if redis.call('EXISTS', KEYS[1]) == 0 then
    return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
return 1
"""

APPEND_ONCE = """
-- Append an entry to a topic's stream unless the key's mark is there, and leave the mark for
-- the window: of any number of callers with one key, one appends. The mark holds the caller's
-- token, so a caller that tries again after losing the reply learns its first try appended.
-- The entry goes before the mark: a write that fails midway (a script is not rolled back)
-- leaves an entry without its mark (appended twice at worst), never a mark without its entry.
-- KEYS: the topic's stream, the key's mark (same hash tag: same cluster slot)
-- ARGV: its approximate MAXLEN, the entry's data, the window in ms, the caller's token
local mark = redis.call('GET', KEYS[2])
if mark then
    if mark == ARGV[4] then return 1 end
    return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[3])
return 1
"""

REPLAY = """
-- Move one dead letter back to its group as a first attempt, only if it is still in the
-- dead-letter stream: of several replays running at once, exactly one moves each record.
-- KEYS: the group's dead-letter stream, the group's retry stream
-- ARGV: the dead letter's id, the entry's data
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then
    return 0  -- gone already (another replay moved it, or it was purged)
end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[2], 'a', '1')
return 1
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
-- ARGV: group, min idle ms, list-only flag ('1': remove nothing, return the candidates)
-- Returns the names removed (or, list-only, those that would be).
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
        if ARGV[3] ~= '1' then
            for _, key in ipairs(KEYS) do
                redis.pcall('XGROUP', 'DELCONSUMER', key, ARGV[1], name)
            end
        end
        table.insert(removed, name)
    end
end
return removed
"""

KEEP_EXTREMES = """
-- Keep the smallest and largest observations of a metrics hash: a field ending in 'min_us'
-- takes its value only if that is smaller than what it holds, any other only if larger, so
-- every worker's extremes merge like its HINCRBYs do. Sent with EVAL: it is rare (extremes
-- seldom change) and a pipeline of EVALSHAs would cost a SCRIPT EXISTS round trip.
-- KEYS: the metrics hash
-- ARGV: field, value, field, value, ...
for i = 1, #ARGV, 2 do
    local field, value = ARGV[i], tonumber(ARGV[i + 1])
    local held = tonumber(redis.call('HGET', KEYS[1], field))
    local smaller = string.sub(field, -6) == 'min_us'
    if held == nil or (smaller and value < held) or (not smaller and value > held) then
        redis.call('HSET', KEYS[1], field, ARGV[i + 1])
    end
end
return 0
"""


PURGE_BACKLOG = """
-- Drop a topic's backlog but keep its groups: every group is moved to the end of the topic
-- stream and of its retry stream with nothing pending there, then both are emptied, and the
-- scheduled retries and delayed events are deleted. One step, so no fetch sees half of it.
-- KEYS: topic stream, the topic's delayed zset, then per group its retry stream and due zset
-- ARGV: the group names, in the order of their KEYS pairs
-- Returns how many entries the topic stream held.
local function settle(key, group)
    -- Acknowledged, not just skipped: a pending entry would otherwise be reclaimed after
    -- the purge, or show as pending forever.
    local moved = redis.pcall('XGROUP', 'SETID', key, group, '$')
    if type(moved) == 'table' and moved.err then
        return  -- no such stream, or no such group on it
    end
    while true do
        local held = redis.call('XPENDING', key, group, '-', '+', 1000)
        if #held == 0 then
            break
        end
        local ids = {}
        for i, entry in ipairs(held) do
            ids[i] = entry[1]
        end
        redis.call('XACK', key, group, unpack(ids))
    end
end
local removed = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
    removed = redis.call('XLEN', KEYS[1])
end
for i, group in ipairs(ARGV) do
    local retry = KEYS[1 + 2 * i]
    settle(KEYS[1], group)
    settle(retry, group)
    if redis.call('EXISTS', retry) == 1 then
        redis.call('XTRIM', retry, 'MAXLEN', 0)
    end
    redis.call('DEL', KEYS[2 + 2 * i])
end
if removed > 0 then
    redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)
end
redis.call('DEL', KEYS[2])
return removed
"""
