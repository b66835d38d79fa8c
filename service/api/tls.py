"""The certificate of the CA that signs every database server's certificate: clients verify servers with it."""

from __future__ import annotations

from flask import Response
from flask.views import MethodView
from flask_smorest import Blueprint

from .common import current_services

tls = Blueprint("tls", __name__, description="The certificate authority that signs every database server's certificate")


@tls.route("/ca.pem")
class CertificateAuthority(MethodView):
    # Public, as a CA's certificate is: clients check servers with it.
    @tls.doc(security=[])
    @tls.response(200, {"type": "string"}, content_type="application/x-pem-file",
                  description="The CA's certificate (PEM), for sslmode=verify-full with sslrootcert")
    @tls.alt_response(503, response="SERVICE_UNAVAILABLE", description="The metadata store is unreachable")
    def get(self):
        """The certificate of the CA that signs every database server's certificate"""
        return Response(current_services().authority.certificate_pem(), mimetype="application/x-pem-file")
