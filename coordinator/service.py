"""The coordinator's researcher-facing gRPC servicer: thin. The researcher is who their client
certificate says (``CallerPolicy`` admits researcher certificates only); nothing in the request
or its metadata can claim an identity. The coordinator's own refusals travel as a status plus
the ``fedtre-refusal`` trailer (``fedtre.status``); the trusts' refusals are in the answer."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from coordinator.engine import CoordinatorEngine
from coordinator.present import project_budget, project_info, query_result
from fedtre.serde.coordinator import (
    catalog_to_proto,
    project_budget_request_from_proto,
    project_budget_to_proto,
    project_list_to_proto,
    query_result_to_proto,
    submission_from_proto,
)
from fedtre.status import abort
from fedtre.v2 import coordinator_pb2 as cpb
from fedtre.v2 import coordinator_pb2_grpc


class ResearcherServicer(coordinator_pb2_grpc.ResearcherServiceServicer):
    def __init__(
        self, engine: CoordinatorEngine, researcher: Callable[[grpc.ServicerContext], str]
    ) -> None:
        self.engine = engine
        self._researcher = researcher

    def Submit(
        self, request: cpb.SubmitRequest, context: grpc.ServicerContext
    ) -> cpb.SubmitResponse:
        sub = submission_from_proto(request)
        try:
            outcome = self.engine.submit(self._researcher(context), sub)
        except Exception as exc:  # every failure maps to a status in one place
            abort(context, exc, request.query_id if len(request.query_id) <= 128 else "")
        return query_result_to_proto(query_result(outcome))

    def ListProjects(
        self, request: cpb.ListProjectsRequest, context: grpc.ServicerContext
    ) -> cpb.ProjectList:
        try:
            projects = self.engine.projects(self._researcher(context))
        except Exception as exc:
            abort(context, exc)
        described = self.engine.trusts.described
        return project_list_to_proto([project_info(p, described) for p in projects])

    def Catalog(
        self, request: cpb.CatalogRequest, context: grpc.ServicerContext
    ) -> cpb.CatalogInfo:
        try:
            catalog = self.engine.catalog(self._researcher(context))
        except Exception as exc:
            abort(context, exc)
        return catalog_to_proto(catalog)

    def Budget(
        self, request: cpb.ProjectBudgetRequest, context: grpc.ServicerContext
    ) -> cpb.ProjectBudget:
        project_id = project_budget_request_from_proto(request)
        try:
            project, outcomes = self.engine.budget(self._researcher(context), project_id)
        except Exception as exc:
            abort(context, exc)
        return project_budget_to_proto(project_budget(project, outcomes))
