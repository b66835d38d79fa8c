"""Run by Django's own test runner (`manage.py test --parallel 2`), which makes
its test database, and a copy of it per process, on the dbprov server."""

from django.db import IntegrityError, connection, transaction
from django.test import TestCase, TransactionTestCase

from .models import Entry


class JsonFieldTests(TestCase):
    def test_a_json_document_round_trips_and_is_queried_inside(self):
        Entry.objects.create(label="a", data={"tags": ["red", "blue"], "size": 3})
        Entry.objects.create(label="b", data={"tags": ["green"], "size": 5})
        self.assertEqual(Entry.objects.get(label="a").data["tags"], ["red", "blue"])
        self.assertEqual(list(Entry.objects.filter(data__tags__contains=["blue"]).values_list("label", flat=True)), ["a"])
        self.assertEqual(Entry.objects.filter(data__size__gt=4).count(), 1)

    def test_each_test_starts_empty(self):
        self.assertEqual(Entry.objects.count(), 0)
        self.assertTrue(connection.settings_dict["NAME"].startswith("test_"))


class CommitTests(TransactionTestCase):
    def test_a_commit_is_seen_and_a_failed_one_is_not(self):
        with transaction.atomic():
            Entry.objects.create(label="kept")
        with self.assertRaises(IntegrityError), transaction.atomic():
            Entry.objects.create(label="kept")
        self.assertEqual(Entry.objects.count(), 1)

    def test_each_test_starts_empty(self):
        self.assertEqual(Entry.objects.count(), 0)
