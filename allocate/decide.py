"""The allocation decision: which waiting lead goes to which agent of a queue, now (CONTRACT.md §8).

`decide` is pure. The allocator loads a queue's waiting leads, its agents with their loads and
the queue's strategy state, calls it, and writes the outcome in one transaction; the simulator
and the tests call the same function with frozen clocks. Nothing here reads the clock, does
I/O or mutates its inputs: the strategies' memory comes back as a new `QueueState`.

Leads are served in priority order and each either gets an agent (`Assign`), waits for its
call window (`Defer`), leaves the queue for good (`Block`), or stays queued with a reason ops
can act on (`waiting`). Within one decision an assignment counts against its agent's
capacity and daily cap at once, so a batch can never overfill an agent.

Every strategy also advances start-time fair queueing clocks (`QueueState.virtual_time`,
`agent_vtime`): an assignment's start tag is max(agent's clock, queue's), the agent's clock
moves to start + 1/weight and the queue's to the start. An agent back from a break therefore
resumes at the queue's current virtual time instead of being flooded until their count
catches up with colleagues who kept working. `least_loaded` breaks load ties by start tag;
`weighted` picks the smallest start tag (then finish tag, then id), as start-time fair
queueing does. Picking the smallest finish tag instead, while the queue's clock follows
start tags, starves light agents: heavy agents' turns pull the queue's clock past a waiting
light agent's, whose finish tag becomes the queue's clock plus a whole 1/weight and so stays
later than a heavy agent's for good (weights 1:2:3 give the weight-1 agent nothing at all).

Speed: the allocator's own budget is a few microseconds per lead. Eligibility is worked out
once per distinct (business line, segment, language) of the batch and each agent's shift
once per call; keys served by the same agents share one pool, in which an agent is found in
a sorted ring (round robin) or two heaps (least loaded, weighted), never by scanning the
roster. The heaps split agents by whether their fair-queueing clock is ahead of the queue's:
ahead, an agent's sort key is fixed; behind, it depends on the queue's clock only through a
term all of them share, so their order is fixed too. An assignment only raises its agent's
key, so its agent's entries in other pools are left as they are: sorting too early, each is
noticed as stale when it surfaces and re-filed then; an agent whom the queue's clock
overtakes likewise moves heap when met.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from allocate import clock
from allocate.model import (
    ANY,
    AgentSnapshot,
    Assign,
    Block,
    Defer,
    Outcome,
    QueueSpec,
    QueueState,
    WaitingLead,
    Window,
)
from schemas.vocab import Strategy

#: The virtual time of an agent the queue has no clock for yet: max() with the queue's wins.
_NO_CLOCK = float("-inf")

#: A heap entry: three sort fields, the agent's id (the last tie-break), index and version
#: (an entry of an earlier version is stale: re-filed with the current key when met).
_Entry = tuple[float, float, float, str, int, int]


def decide(
    queue: QueueSpec,
    leads: Sequence[WaitingLead],
    agents: Sequence[AgentSnapshot],
    state: QueueState,
    now: datetime,
) -> Outcome:
    """Allocate `leads` of `queue` to `agents` at the instant `now` (timezone-aware).

    Lead and agent ids are unique. A timezone that is not a known IANA zone, a lead's or an
    agent's, is read as the queue's `default_timezone`. Every lead ends up in exactly one of
    the outcome's assignments, deferred, blocked or waiting; `state` is left as it was.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    roster = _Roster(queue, agents, state, now)
    window = queue.call_window
    closed_until: dict[str | None, tuple[datetime, str] | None] = {}  # by lead timezone
    deadline = now + queue.sla
    outcome = Outcome()
    for lead in sorted(leads, key=_service_order):
        if lead.dnc:
            outcome.blocked.append(Block(lead.id, "do_not_call", "phone on the do-not-call list"))
            continue
        if lead.attempts >= queue.max_attempts:
            reason = f"{lead.attempts} attempts made, the queue allows {queue.max_attempts}"
            outcome.blocked.append(Block(lead.id, "closed", reason))
            continue
        if window is not None:
            if lead.timezone not in closed_until:
                closed_until[lead.timezone] = _closed(window, lead.timezone, queue, now)
            closed = closed_until[lead.timezone]
            if closed is not None:
                outcome.deferred.append(Defer(lead.id, *closed))
                continue
        choice = roster.choose(lead)
        if isinstance(choice, str):
            outcome.waiting[lead.id] = choice
            continue
        agent, strategy, reason = choice
        outcome.assignments.append(
            Assign(lead.id, roster.ids[agent], strategy, reason, lead.attempts + 1, deadline)
        )
        roster.take(agent)
    outcome.state = roster.state()
    return outcome


def _service_order(lead: WaitingLead) -> tuple[int, bool, datetime, int]:
    return (-lead.priority, not lead.realtime, lead.queued_at, lead.id)


def _closed(
    window: Window, tz: str | None, queue: QueueSpec, now: datetime
) -> tuple[datetime, str] | None:
    """If `window` is closed now for a lead in `tz`: when it opens, and why the lead waits."""
    zone = clock.zone(tz, queue.default_timezone)
    local = now.astimezone(zone).time()
    if window.contains(local):
        return None
    where = zone.key if zone.key == tz else f"{zone.key} (queue default)"
    reason = f"outside the call window {window}: {local:%H:%M} in {where}"
    return clock.next_opening(window, now, zone.key), reason


class _Skill:
    """Who may take the leads of one (business line, segment, language), as this decision sees
    them: `skilled` agents, of whom `present` are available and on shift (`absent` says why
    the others are not, for ops), sharing `pool` with every other key of the same agents."""

    __slots__ = ("absent", "pool", "present", "skilled", "what")

    def __init__(
        self, what: str, skilled: frozenset[int], present: list[int], absent: str, pool: _Pool
    ) -> None:
        self.what = what
        self.skilled = skilled
        self.present = present
        self.absent = absent
        self.pool = pool


class _Pool:
    """The present agents of one or more `_Skill`s, ready to be picked from.

    `room` counts those with room left. `ring` (round robin: ids in order) holds the ones that
    had room when the pool was built, ids of agents who filled up since are dropped when met.
    `ahead` and `behind` (the other strategies) hold each agent with room once, by whether
    their fair-queueing clock is ahead of the queue's, beside stale entries skipped when met.
    """

    __slots__ = ("ahead", "behind", "ring", "room")

    def __init__(self) -> None:
        self.room = 0
        self.ring: list[str] = []
        self.ahead: list[_Entry] = []
        self.behind: list[_Entry] = []


class _Roster:
    """The agents of one decision with their loads and clocks as assignments accumulate."""

    def __init__(
        self,
        queue: QueueSpec,
        agents: Sequence[AgentSnapshot],
        state: QueueState,
        now: datetime,
    ) -> None:
        self.agents = agents
        self.initial_vtime = state.agent_vtime
        self.ids = [agent.id for agent in agents]
        self.index = {agent_id: i for i, agent_id in enumerate(self.ids)}
        self.open = [agent.open_count for agent in agents]
        self.today = [agent.today_count for agent in agents]
        self.capacity = [agent.capacity for agent in agents]
        self.daily_cap = [agent.daily_cap for agent in agents]
        self.step = [1 / agent.weight for agent in agents]
        self.has_room = [
            agent.open_count < agent.capacity and agent.today_count < agent.daily_cap
            for agent in agents
        ]
        local_times = {
            tz: now.astimezone(clock.zone(tz, queue.default_timezone)).time()
            for tz in {agent.timezone for agent in agents}
        }
        #: Why an agent cannot take leads now ("away", "offline", "off shift"), "" if they can.
        self.absence = [
            agent.status
            if agent.status != "available"
            else "off shift"
            if agent.shift is not None and not agent.shift.contains(local_times[agent.timezone])
            else ""
            for agent in agents
        ]
        self.vtime = [state.agent_vtime.get(agent.id, _NO_CLOCK) for agent in agents]
        self.version = [0] * len(agents)
        self.virtual_time = state.virtual_time
        self.rr_cursor = state.rr_cursor
        self.taken: set[int] = set()
        self.skills: dict[tuple[str, str, str | None], _Skill] = {}
        self.pools: dict[tuple[int, ...], _Pool] = {}
        self.pools_of: list[list[_Pool]] = [[] for _ in agents]
        sticky = queue.strategy == "sticky"
        fallback = queue.fallback_strategy if sticky else queue.strategy
        self.sticky = sticky
        self.strategy: Strategy = "least_loaded" if fallback == "sticky" else fallback
        self.weighted = self.strategy == "weighted"

    def state(self) -> QueueState:
        vtimes = dict(self.initial_vtime)
        vtimes.update({self.ids[i]: self.vtime[i] for i in self.taken})
        return QueueState(self.rr_cursor, self.virtual_time, vtimes)

    # --- eligibility --------------------------------------------------------------------------

    def skill(self, lead: WaitingLead) -> _Skill:
        key = (lead.business_line, lead.segment, lead.language)
        skill = self.skills.get(key)
        if skill is None:
            skill = self.skills[key] = self._skill(*key)
        return skill

    def _skill(self, line: str, segment: str, language: str | None) -> _Skill:
        skilled = [
            i
            for i, agent in enumerate(self.agents)
            if (line in agent.business_lines or ANY in agent.business_lines)
            and (segment in agent.segments or ANY in agent.segments)
            and (not agent.languages or language is None or language in agent.languages)
        ]
        present = [i for i in skilled if not self.absence[i]]
        absent = Counter(self.absence[i] for i in skilled if self.absence[i])
        pool = self.pools.get(tuple(present))
        if pool is None:
            pool = self.pools[tuple(present)] = self._pool(present)
        return _Skill(
            f"{line}/{segment}" + (f" in {language}" if language else ""),
            frozenset(skilled),
            present,
            ", ".join(f"{count} {why}" for why, count in sorted(absent.items())),
            pool,
        )

    def _pool(self, present: list[int]) -> _Pool:
        pool = _Pool()
        with_room = [i for i in present if self.has_room[i]]
        pool.room = len(with_room)
        for i in with_room:
            self.pools_of[i].append(pool)
        if self.strategy == "round_robin":
            pool.ring = sorted(self.ids[i] for i in with_room)
        else:
            for i in with_room:
                self._file(pool, i)
        return pool

    # --- choosing -----------------------------------------------------------------------------

    def choose(self, lead: WaitingLead) -> tuple[int, Strategy, str] | str:
        """An agent for `lead` with the strategy that chose it and why, or why there is none."""
        skill = self.skill(lead)
        fell_through = ""
        if self.sticky:
            last = self._sticky(lead, skill)
            if isinstance(last, int):
                return last, "sticky", f"sticky: {lead.last_agent} worked this customer last"
            fell_through = f"sticky fell through ({last}); "
        picked = self._pick(lead.excluded_agents, skill.pool) if skill.pool.room else None
        if picked is None:
            return self._why_none(skill)
        agent, reason = picked
        return agent, self.strategy, fell_through + reason

    def _sticky(self, lead: WaitingLead, skill: _Skill) -> int | str:
        """The customer's last agent if they can take `lead`, else why not."""
        last = lead.last_agent
        if last is None:
            return "no previous agent"
        i = self.index.get(last)
        if i is None:
            return f"{last} is not among this queue's agents"
        if last in lead.excluded_agents:
            return f"{last} already had this lead"
        if i not in skill.skilled:
            return f"{last} is not skilled for {skill.what}"
        if self.absence[i]:
            return f"{last} is {self.absence[i]}"
        if self.open[i] >= self.capacity[i]:
            return f"{last} is at capacity"
        if self.today[i] >= self.daily_cap[i]:
            return f"{last} reached the daily cap"
        return i

    def _pick(self, excluded: frozenset[str], pool: _Pool) -> tuple[int, str] | None:
        if self.strategy == "round_robin":
            return self._round_robin(excluded, pool)
        agent = self._fairest(excluded, pool)
        if agent is None:
            return None
        if self.weighted:
            return agent, f"weighted fair share (weight {1 / self.step[agent]:g})"
        return agent, f"least loaded ({self.open[agent]}/{self.capacity[agent]} open)"

    def _round_robin(self, excluded: frozenset[str], pool: _Pool) -> tuple[int, str] | None:
        ring = pool.ring
        cursor = self.rr_cursor
        i = 0 if cursor is None else bisect_right(ring, cursor)
        seen = 0
        while seen < len(ring):
            if i >= len(ring):
                i = 0
            agent = self.index[ring[i]]
            if not self.has_room[agent]:
                del ring[i]
            elif ring[i] in excluded:
                i += 1
                seen += 1
            else:
                self.rr_cursor = ring[i]
                if cursor is None:
                    return agent, "round robin, first turn"
                return agent, f"round robin after {cursor}"
        return None

    def _file(self, pool: _Pool, i: int) -> None:
        """Put agent `i` in the heap of `pool` their clock puts them in, with their sort key.

        Least loaded sorts by (open/capacity, open, start tag, id), weighted by (start tag,
        finish tag, id); the start tag is max(own clock, queue's), the finish tag start +
        1/weight. Behind the queue's clock the start tag is the queue's clock for everyone,
        so the entry holds 0 in its place (and 1/weight for the finish); `_key` restores it.
        """
        own, queue = self.vtime[i], self.virtual_time
        ahead = own > queue
        entry: _Entry
        if self.weighted:
            start = own if ahead else 0
            entry = (start, start + self.step[i], 0, self.ids[i], i, self.version[i])
        else:
            share = self.open[i] / self.capacity[i]
            entry = (share, self.open[i], own if ahead else 0, self.ids[i], i, self.version[i])
        heapq.heappush(pool.ahead if ahead else pool.behind, entry)

    def _key(self, entry: _Entry, behind: bool) -> tuple[float, float, float, str]:
        """The full sort key of a current entry."""
        if not behind:
            return entry[:4]
        if self.weighted:
            return (self.virtual_time, self.virtual_time + entry[1], 0, entry[3])
        return (entry[0], entry[1], self.virtual_time, entry[3])

    def _top(self, pool: _Pool, behind: bool) -> _Entry | None:
        """The current first entry of one of `pool`'s heaps, after dropping stale ones and
        moving the agents the queue's clock has overtaken from `ahead` to `behind`."""
        heap = pool.behind if behind else pool.ahead
        while heap:
            entry = heap[0]
            i = entry[4]
            if entry[5] != self.version[i]:
                heapq.heappop(heap)
                if self.has_room[i]:
                    self._file(pool, i)
            elif not behind and self.vtime[i] <= self.virtual_time:
                heapq.heappop(heap)
                self._file(pool, i)
            else:
                return entry
        return None

    def _tops(self, pool: _Pool) -> tuple[_Entry | None, _Entry | None]:
        """The current first entries of `pool`'s heaps. Cleaning one heap can file agents in
        the other, so `ahead` is looked at again until cleaning `behind` leaves it alone."""
        while True:
            ahead = self._top(pool, behind=False)
            behind = self._top(pool, behind=True)
            if (pool.ahead[0] if pool.ahead else None) is ahead:
                return ahead, behind

    def _fairest(self, excluded: frozenset[str], pool: _Pool) -> int | None:
        """The agent of `pool` with room and the smallest sort key, skipping `excluded`."""
        skipped: list[tuple[bool, _Entry]] = []
        chosen = None
        while True:
            ahead, behind = self._tops(pool)
            if ahead is None and behind is None:
                break
            from_behind = ahead is None or (
                behind is not None and self._key(behind, True) < self._key(ahead, False)
            )
            entry = behind if from_behind else ahead
            assert entry is not None  # one of the two is not None
            if excluded and entry[3] in excluded:
                skipped.append((from_behind, entry))
                heapq.heappop(pool.behind if from_behind else pool.ahead)
                continue
            chosen = entry[4]
            break
        for from_behind, entry in skipped:
            heapq.heappush(pool.behind if from_behind else pool.ahead, entry)
        return chosen

    def _why_none(self, skill: _Skill) -> str:
        if not skill.skilled:
            return f"no agent is skilled for {skill.what}"
        if not skill.present:
            return f"no agent skilled for {skill.what} is available and on shift ({skill.absent})"
        room = skill.pool.room
        full = len(skill.present) - room
        if not room:
            if full == 1:
                return "the only eligible agent is at capacity or daily cap"
            return f"all {full} eligible agents at capacity or daily cap"
        if not full:
            return "only agents who already had it are available"
        return f"only agents who already had it have room; {full} more at capacity or daily cap"

    # --- bookkeeping --------------------------------------------------------------------------

    def take(self, i: int) -> None:
        """Count an assignment to agent `i`: load, room, and the fair-queueing clocks."""
        self.open[i] += 1
        self.today[i] += 1
        start = max(self.vtime[i], self.virtual_time)
        self.vtime[i] = start + self.step[i]
        self.virtual_time = start
        self.taken.add(i)
        self.version[i] += 1
        if self.has_room[i] and (
            self.open[i] >= self.capacity[i] or self.today[i] >= self.daily_cap[i]
        ):
            self.has_room[i] = False
            for pool in self.pools_of[i]:
                pool.room -= 1
