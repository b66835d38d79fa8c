from django.db import models


class Entry(models.Model):
    label = models.CharField(max_length=40, unique=True)
    data = models.JSONField(default=dict)
