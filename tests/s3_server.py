"""An S3 server for the tests: moto's, bound to 127.0.0.1, run as its own process.

    python tests/s3_server.py PORT

moto 5.2.1 answers CompleteMultipartUpload with the wrong XML root element
(getmoto/moto#10055, fixed in 5.2.2); boto3 ignores it but the AWS C++ SDK
under pyarrow reads it as an error hidden in a 200 response and retries until
it fails, so every file pyarrow writes in parts (≥ 5 MiB: checkpoints) would be
lost. The response is rewritten here, on the wire, for the moto versions with
that bug; everything else is moto's server unchanged.
"""
import re
import sys

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

_ROOT = re.compile(rb"(<\?xml[^>]*>\s*)<(\w+)([ >])(.*)</\2>(\s*)$", re.S)


def complete_multipart_fix(app):
    """WSGI middleware: the CompleteMultipartUpload answer gets its documented root element."""

    def fixed(environ, start_response):
        completing = environ["REQUEST_METHOD"] == "POST" and "uploadId=" in environ.get("QUERY_STRING", "")
        if not completing:
            return app(environ, start_response)
        captured = {}

        def capture(status, headers, exc_info=None):
            captured.update(status=status, headers=headers)
            return lambda data: None

        body = b"".join(app(environ, capture))
        body = _ROOT.sub(rb"\1<CompleteMultipartUploadResult\3\4</CompleteMultipartUploadResult>\5", body)
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        start_response(captured["status"], headers + [("Content-Length", str(len(body)))])
        return [body]

    return fixed


def main(port: int) -> None:
    app = complete_multipart_fix(DomainDispatcherApplication(create_backend_app))
    make_server("127.0.0.1", port, app, threaded=True).serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]))
