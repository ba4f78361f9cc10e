#!/bin/sh
# Make sure TabbyAPI's reasoning parser (PR #295) is in the git checkout in the current directory, or fail.
#
# Usage: ensure-pr295.sh PR_HEAD_SHA      (remote "origin" must serve pull/295/head)
#
# PR #295 was merged into TabbyAPI main on 2026-03-17 (8eb6c65); a pin from before that date lacks it, and GLM-4.7's
# <think> blocks would then come back inside `content`. So: if HEAD already contains the PR head, nothing is merged;
# otherwise pull/295/head is fetched, checked to be the expected commit, and merged the way the model card's
# Dockerfile does (-X theirs: the known conflict in config_sample.yml goes to the PR's side). Either way the tree
# must then carry the parser (the config field and the response field), or this exits non-zero and the build fails.
set -eu

pr_head="${1:-}"
case "$pr_head" in
  ''|*[!0-9a-f]*) echo "ensure-pr295: PR_HEAD_SHA must be a full lower-case hex commit id" >&2; exit 2 ;;
esac
if [ "${#pr_head}" -ne 40 ]; then
  echo "ensure-pr295: PR_HEAD_SHA must have 40 hex digits, got ${#pr_head}" >&2
  exit 2
fi

base="$(git rev-parse --verify HEAD)"
if git merge-base --is-ancestor "$pr_head" HEAD 2>/dev/null; then
  echo "ensure-pr295: $base already contains PR #295 ($pr_head): nothing to merge"
else
  echo "ensure-pr295: $base lacks PR #295: fetching pull/295/head and merging it (-X theirs)"
  if ! git fetch --quiet origin "+refs/pull/295/head:refs/heads/pr-295"; then
    echo "ensure-pr295: cannot fetch pull/295/head from origin" >&2
    exit 1
  fi
  fetched="$(git rev-parse --verify refs/heads/pr-295)"
  if [ "$fetched" != "$pr_head" ]; then
    echo "ensure-pr295: origin's pull/295/head is $fetched, expected $pr_head: refusing to merge an unknown head" >&2
    exit 1
  fi
  if ! git -c user.name=glm-deploy -c user.email=glm-deploy@localhost \
      merge --quiet --no-edit -X theirs refs/heads/pr-295; then
    echo "ensure-pr295: merging PR #295 into $base failed (a conflict -X theirs cannot settle)" >&2
    exit 1
  fi
  echo "ensure-pr295: merged PR #295 into $base -> $(git rev-parse HEAD)"
fi

# The check on the tree: the parser's config field and the response field it fills.
missing=""
grep -q -F "reasoning_start_token" common/config_models.py 2>/dev/null \
  || missing="$missing common/config_models.py:reasoning_start_token"
grep -q -F "reasoning_content" endpoints/OAI/types/chat_completion.py 2>/dev/null \
  || missing="$missing endpoints/OAI/types/chat_completion.py:reasoning_content"
if [ -n "$missing" ]; then
  echo "ensure-pr295: the reasoning parser (PR #295) is not in the tree; missing:$missing" >&2
  exit 1
fi
echo "ensure-pr295: reasoning parser present"
