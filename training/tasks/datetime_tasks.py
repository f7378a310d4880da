"""Tasks over dates and clock times: iso_date (held in) and time_24h (held out)."""

from __future__ import annotations

import datetime as dt
import random

from training.tasks.base import Item, Task

_MONTHS = (
    "January February March April May June July August September October November December"
).split()
_DAY0 = dt.date(1900, 1, 1).toordinal()
_DAY1 = dt.date(2099, 12, 31).toordinal()


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def render_date(d: dt.date, style: int) -> str:
    month, short = _MONTHS[d.month - 1], _MONTHS[d.month - 1][:3]
    return (
        f"{month} {d.day}, {d.year}",  # March 5, 2021
        f"{d.day} {month} {d.year}",  # 5 March 2021
        f"the {_ordinal(d.day)} of {month}, {d.year}",  # the 5th of March, 2021
        f"{month} {_ordinal(d.day)} {d.year}",  # March 5th 2021
        f"{short} {d.day} {d.year}",  # Mar 5 2021
        f"{d.day} {short} {d.year}",  # 5 Mar 2021
        f"{d.month}/{d.day}/{d.year} (month/day/year)",  # US numeric, made explicit
        f"{d.day:02d}.{d.month:02d}.{d.year}",  # European dotted day.month.year
        f"{d.year}/{d.month:02d}/{d.day:02d}",  # year/month/day
    )[style]


_N_DATE_STYLES = 9


def _date_item(rng: random.Random) -> Item:
    d = dt.date.fromordinal(rng.randint(_DAY0, _DAY1))
    return Item(
        key=d.isoformat(),
        fields={"date": render_date(d, rng.randrange(_N_DATE_STYLES))},
        answer=d.isoformat(),
    )


ISO_DATE = Task(
    name="iso_date",
    kind="held_in",
    description="Convert a date written in words or a common numeric form to an ISO 8601 YYYY-MM-DD date.",
    phrasings=(
        "Convert {date} to ISO format.",
        "Write the date {date} as YYYY-MM-DD.",
        "What is {date} in ISO 8601 format?",
        "Format this date as YYYY-MM-DD: {date}",
        "Give the ISO date for {date}.",
        "Rewrite {date} in the form year-month-day (YYYY-MM-DD).",
        "Date: {date}. Convert it to ISO 8601.",
        "Turn {date} into a YYYY-MM-DD date string.",
        # test only
        "Normalize the date {date} to ISO format, please.",
        "My form only accepts YYYY-MM-DD. How do I enter {date}?",
    ),
    sampler=_date_item,
)


def _time_item(rng: random.Random) -> Item:
    hour12, minute, pm = rng.randint(1, 12), rng.randint(0, 59), rng.random() < 0.5
    hour24 = hour12 % 12 + (12 if pm else 0)
    suffix = rng.choice(("pm", "PM") if pm else ("am", "AM"))
    if minute == 0 and rng.random() < 0.5:
        text = f"{hour12} {suffix}"
    else:
        text = f"{hour12}:{minute:02d}{rng.choice((' ', ''))}{suffix}"
    return Item(
        key=f"{hour24:02d}:{minute:02d}",
        fields={"time": text},
        answer=f"{hour24:02d}:{minute:02d}",
    )


TIME_24H = Task(
    name="time_24h",
    kind="held_out",
    description="Convert a 12-hour clock time with am/pm to 24-hour HH:MM format.",
    phrasings=(
        "Convert {time} to 24-hour time.",
        "What is {time} in 24-hour format?",
        "Write {time} as HH:MM on a 24-hour clock.",
        "Give the 24-hour clock time for {time}.",
        "Express {time} in military time (HH:MM).",
        "Time: {time}. Convert it to the 24-hour clock.",
        "Rewrite {time} using the 24-hour clock.",
        "How is {time} written on a 24-hour clock?",
        # test only
        "The train leaves at {time}; what does the 24-hour timetable say?",
        "24h format please: {time}",
    ),
    sampler=_time_item,
)


_WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()


def _weekday_item(rng: random.Random) -> Item:
    d = dt.date.fromordinal(rng.randint(_DAY0, _DAY1))
    return Item(key=d.isoformat(), fields={"date": render_date(d, rng.randrange(_N_DATE_STYLES))},
                answer=_WEEKDAYS[d.weekday()])


DATE_WEEKDAY = Task(
    name="date_weekday",
    kind="held_out",
    description="Convert a date written in words or a common numeric form to the day of the week it falls on.",
    phrasings=(
        "What day of the week was {date}?",
        "Which weekday is {date}?",
        "Give the day of the week for {date}.",
        "Date: {date}. What weekday is it?",
        "On what day of the week does {date} fall?",
        "Convert {date} to its weekday name.",
        "Tell me the weekday of {date}.",
        "{date} was a what (Monday to Sunday)?",
        # test only
        "I was born on {date}. Which day of the week was that?",
        "Weekday please: {date}",
    ),
    sampler=_weekday_item,
)
