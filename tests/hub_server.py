""" A stand-in for the Hugging Face Hub's file endpoints, serving local folders on 127.0.0.1.

Answers HEAD and GET on /{owner}/{name}/resolve/{revision}/{filename} with the headers
huggingface_hub reads (X-Repo-Commit, ETag, Content-Length), and 404 with the Hub's error code for
files that are not there. Every request is recorded, so tests can tell whether the network was used.
"""
import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List

COMMIT = '0123456789abcdef0123456789abcdef01234567'


class HubServer:
    def __init__(self, repos: Dict[str, Path]):
        self.repos = repos
        self.requests: List[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(send_body=False)

            def do_GET(self):
                self._answer(send_body=True)

            def _answer(self, send_body: bool):
                server.requests.append(f'{self.command} {self.path}')
                parts = self.path.split('?')[0].strip('/').split('/')
                if len(parts) < 5 or parts[2] != 'resolve' or '/'.join(parts[:2]) not in server.repos:
                    return self._not_found('RepoNotFound')
                file = server.repos['/'.join(parts[:2])] / '/'.join(parts[4:])
                if not file.is_file():
                    return self._not_found('EntryNotFound')
                body = file.read_bytes()
                self.send_response(200)
                self.send_header('X-Repo-Commit', COMMIT)
                self.send_header('ETag', f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header('Content-Length', str(len(body)))
                self.send_header('Content-Type', 'application/octet-stream')
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def _not_found(self, code: str):
                self.send_response(404)
                self.send_header('X-Error-Code', code)
                self.send_header('Content-Length', '0')
                self.end_headers()

        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self._httpd.server_address[1]}'
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


def recording_hub_api(uploads: List[tuple]) -> type:
    """A stand-in for huggingface_hub.HfApi (the Hub is out of reach) that records each upload in `uploads` as
    (repo_id, the uploaded folder's file names)."""
    import huggingface_hub

    class RecordingApi:
        endpoint = 'https://huggingface.co'

        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            assert exist_ok  # converting again into the same repository must not fail
            return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploads.append((repo_id, sorted(os.listdir(folder_path))))

    return RecordingApi
