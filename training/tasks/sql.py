"""text_to_sql: questions about one employees table -> a SQLite query, scored by executing it."""

from __future__ import annotations

import functools
import random
import re
import sqlite3

from training.tasks.base import Item, Task

SCHEMA = "employees(id, name, department, salary, age)"
DEPARTMENTS = ("Sales", "Engineering", "Marketing", "HR", "Finance")
EMPLOYEES: tuple[tuple[int, str, str, int, int], ...] = (
    (1, "Alice", "Engineering", 95000, 34),
    (2, "Bob", "Sales", 55000, 45),
    (3, "Carol", "Marketing", 62000, 29),
    (4, "Dave", "Engineering", 105000, 41),
    (5, "Eve", "HR", 48000, 38),
    (6, "Frank", "Finance", 78000, 52),
    (7, "Grace", "Engineering", 88000, 27),
    (8, "Heidi", "Sales", 61000, 31),
    (9, "Ivan", "Finance", 83000, 36),
    (10, "Judy", "Marketing", 57000, 24),
    (11, "Mallory", "Sales", 49000, 58),
    (12, "Niaj", "Engineering", 120000, 47),
    (13, "Olivia", "HR", 52000, 43),
    (14, "Peggy", "Finance", 91000, 39),
    (15, "Rupert", "Marketing", 70000, 50),
    (16, "Sybil", "Sales", 66000, 26),
    (17, "Trent", "Engineering", 99000, 33),
    (18, "Uma", "HR", 45000, 22),
    (19, "Victor", "Finance", 72000, 61),
    (20, "Wendy", "Marketing", 64000, 35),
)
NAMES = tuple(row[1] for row in EMPLOYEES)


def make_db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, department TEXT, salary INTEGER, age INTEGER)"
    )
    conn.executemany("INSERT INTO employees VALUES (?, ?, ?, ?, ?)", EMPLOYEES)
    conn.commit()
    return conn


def run_query(sql: str, *, max_steps: int = 2_000_000) -> list[tuple]:
    """Execute one query on a fresh copy of the table; raises sqlite3.Error (or ValueError) on failure."""
    conn = make_db()
    steps = 0

    def _guard() -> int:  # abort runaway queries (recursive CTEs, huge cross joins)
        nonlocal steps
        steps += 1
        return 1 if steps > max_steps // 1000 else 0

    conn.set_progress_handler(_guard, 1000)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _sorted_rows(rows: list[tuple]) -> list[tuple]:
    def norm(v):
        return round(v, 6) if isinstance(v, float) else v

    return sorted((tuple(norm(v) for v in row) for row in rows), key=repr)


def extract_sql(prediction: str) -> str:
    """The query in a model answer: code fences removed, cut at the first ';'."""
    text = prediction.strip()
    fence = re.search(r"```(?:sql|sqlite)?\s*(.*?)```", text, re.S | re.I)
    if fence:
        text = fence.group(1)
    elif text.startswith("```"):
        text = re.sub(r"^```(?:sql|sqlite)?", "", text, flags=re.I)
    return text.split(";")[0].strip()


def _score_sql(prediction: str, answer: str) -> bool:
    """Execute the predicted query (whole answer up to ';', else its first line) and compare result sets."""
    want = _sorted_rows(run_query(answer))
    query = extract_sql(prediction)
    candidates = [query] + ([query.splitlines()[0].strip()] if "\n" in query else [])
    for candidate in candidates:
        if not candidate:
            continue
        try:
            got = run_query(candidate)
        except (sqlite3.Error, ValueError, OverflowError):
            continue
        return _sorted_rows(got) == want
    return False


def _q(rng: random.Random, *options: str) -> str:
    return rng.choice(options)


@functools.cache
def _has_rows(sql: str) -> bool:
    return bool(run_query(sql))


def _sql_item(rng: random.Random) -> Item:
    """A question whose gold query returns at least one row (an empty gold set would accept any empty query)."""
    while True:
        item = _draw_sql_item(rng)
        if _has_rows(item.answer):
            return item


def _draw_sql_item(rng: random.Random) -> Item:
    d = rng.choice(DEPARTMENTS)
    n = rng.choice(NAMES)
    s = rng.randrange(40, 121) * 1000
    a = rng.randint(22, 62)
    kind = rng.randrange(16)
    if kind == 0:
        q = _q(rng, f"List the names of employees in the {d} department.", f"Who works in {d}?",
               f"Show the names of all {d} employees.")
        sql = f"SELECT name FROM employees WHERE department = '{d}'"
    elif kind == 1:
        q = _q(rng, f"How many employees work in {d}?", f"Count the employees in the {d} department.",
               f"What is the number of people in {d}?")
        sql = f"SELECT COUNT(*) FROM employees WHERE department = '{d}'"
    elif kind == 2:
        q = _q(rng, f"What is the average salary in {d}?", f"Average salary of the {d} department?",
               f"Compute the mean salary of {d} employees.")
        sql = f"SELECT AVG(salary) FROM employees WHERE department = '{d}'"
    elif kind == 3:
        q = _q(rng, f"What is the highest salary in {d}?", f"Maximum salary in the {d} department?")
        sql = f"SELECT MAX(salary) FROM employees WHERE department = '{d}'"
    elif kind == 4:
        q = _q(rng, f"What is the lowest salary in {d}?", f"Minimum salary in the {d} department?")
        sql = f"SELECT MIN(salary) FROM employees WHERE department = '{d}'"
    elif kind == 5:
        q = _q(rng, f"What is the total salary paid to {d}?", f"Sum of salaries in the {d} department?")
        sql = f"SELECT SUM(salary) FROM employees WHERE department = '{d}'"
    elif kind == 6:
        q = _q(rng, f"Which employees earn more than {s}?", f"List the names of employees with a salary above {s}.")
        sql = f"SELECT name FROM employees WHERE salary > {s}"
    elif kind == 7:
        q = _q(rng, f"Which employees earn less than {s}?", f"List the names of employees with a salary below {s}.")
        sql = f"SELECT name FROM employees WHERE salary < {s}"
    elif kind == 8:
        q = _q(rng, f"Which employees are older than {a}?", f"List the names of employees over {a} years old.")
        sql = f"SELECT name FROM employees WHERE age > {a}"
    elif kind == 9:
        q = _q(rng, f"Which employees are younger than {a}?", f"List the names of employees under {a} years old.")
        sql = f"SELECT name FROM employees WHERE age < {a}"
    elif kind == 10:
        q = _q(rng, f"How many employees are older than {a}?", f"Count the employees over the age of {a}.")
        sql = f"SELECT COUNT(*) FROM employees WHERE age > {a}"
    elif kind == 11:
        q = _q(rng, f"Which department does {n} work in?", f"What is {n}'s department?")
        sql = f"SELECT department FROM employees WHERE name = '{n}'"
    elif kind == 12:
        q = _q(rng, f"What is {n}'s salary?", f"How much does {n} earn?")
        sql = f"SELECT salary FROM employees WHERE name = '{n}'"
    elif kind == 13:
        q = _q(rng, f"How old is {n}?", f"What is the age of {n}?")
        sql = f"SELECT age FROM employees WHERE name = '{n}'"
    elif kind == 14:
        q = _q(rng, f"Who is the highest-paid employee in {d}?", f"Name the best-paid person in {d}.")
        sql = f"SELECT name FROM employees WHERE department = '{d}' ORDER BY salary DESC LIMIT 1"
    else:
        q = _q(rng, f"List the employees in {d} earning more than {s}.",
               f"Which {d} employees have a salary above {s}?")
        sql = f"SELECT name FROM employees WHERE department = '{d}' AND salary > {s}"
    return Item(key=sql, fields={"question": q, "schema": SCHEMA}, answer=sql)


TEXT_TO_SQL = Task(
    name="text_to_sql",
    kind="held_in",
    description="Convert a question about the employees table to a SQLite query that answers it.",
    phrasings=(
        "Table {schema}. Write a SQLite query: {question}",
        "Given the table {schema}, write SQL to answer: {question}",
        "SQL for this question over {schema}: {question}",
        "Schema: {schema}\nQuestion: {question}\nSQL:",
        "Translate to SQLite (table {schema}): {question}",
        "Write one SQL query on {schema} that answers: {question}",
        "Using the table {schema}, give the query for: {question}",
        "Database table {schema}. {question} Answer with a SQL query.",
        # test only
        "My HR database has a table {schema}. What query would tell me this: {question}",
        "Question: {question}\nThe data lives in {schema}. Reply with SQLite only.",
    ),
    sampler=_sql_item,
    scorer=_score_sql,
)
