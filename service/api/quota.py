"""The tenant's share of the service: its quota, and the plans a create may name."""

from __future__ import annotations

from flask.views import MethodView
from flask_smorest import Blueprint

from .common import authenticate, current_principal, current_services, guarded
from .schemas import PlanListSchema, QuotaSchema

quota = Blueprint("quota", __name__, description="The tenant's share of the service: quota and plans")
quota.before_request(authenticate)


@quota.route("/quota")
class Quota(MethodView):
    @guarded(quota)
    @quota.response(200, QuotaSchema)
    def get(self):
        """The tenant's live databases and its limit"""
        principal = current_principal()
        used, limit = current_services().tenants.quota(principal.tenant)
        return {"tenant": principal.tenant, "used": used, "limit": limit}


@quota.route("/plans")
class Plans(MethodView):
    @guarded(quota)
    @quota.response(200, PlanListSchema)
    def get(self):
        """The plans a create may name: memory, CPUs and server settings"""
        return {
            "items": [
                {"name": p.name, "memory": p.memory, "cpus": p.cpus, "settings": dict(p.settings)}
                for p in current_services().settings.all_plans.values()
            ]
        }
