-- Argo CD health check for WebhookEndpoint and WebhookSubscription
-- (hooks.webhook-operator.dev). Install it under both keys in argocd-cm:
--   resource.customizations.health.hooks.webhook-operator.dev_WebhookEndpoint
--   resource.customizations.health.hooks.webhook-operator.dev_WebhookSubscription
-- Rules (kstatus): status from an older generation is not trusted yet; Stalled=True needs a
-- human (Degraded); Reconciling=True is work under way (Progressing); Ready rolls up the
-- rest; an endpoint whose deliveries fail (Healthy=False) is Degraded even while Ready.
local hs = {status = "Progressing", message = "Waiting for the operator to report status"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
local found = {}
for _, c in ipairs(obj.status.conditions) do
  if c.observedGeneration == nil or generation == nil or c.observedGeneration == generation then
    found[c.type] = c
  end
end
local function text(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end
if found.Stalled ~= nil and found.Stalled.status == "True" then
  return {status = "Degraded", message = text(found.Stalled)}
end
if found.Reconciling ~= nil and found.Reconciling.status == "True" then
  return {status = "Progressing", message = text(found.Reconciling)}
end
local ready = found.Ready
if ready == nil then
  return hs
end
if ready.status == "True" then
  if found.Healthy ~= nil and found.Healthy.status == "False" then
    return {status = "Degraded", message = text(found.Healthy)}
  end
  return {status = "Healthy", message = text(ready)}
end
if ready.status == "False" then
  return {status = "Degraded", message = text(ready)}
end
return {status = "Progressing", message = text(ready)}
