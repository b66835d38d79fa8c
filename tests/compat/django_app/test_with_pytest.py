"""Run by pytest-django with --create-db: it makes its own test database."""

import pytest
from django.db import connection

from ledger.models import Entry


@pytest.mark.django_db
def test_a_json_document_round_trips():
    Entry.objects.create(label="a", data={"nested": {"n": 1}})
    assert Entry.objects.get(data__nested__n=1).label == "a"
    assert connection.settings_dict["NAME"].startswith("test_")


@pytest.mark.django_db(transaction=True)
def test_a_transactional_test_starts_empty():
    assert Entry.objects.count() == 0
    Entry.objects.create(label="b")
